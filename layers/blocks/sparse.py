"""The block-sparse attention mixers' shared base and pattern helpers.

Sliding window and attention sinks (`layers.mixers.sliding_window`),
strided/fixed (Sparse Transformer, `strided`), BigBird (`bigbird`),
dilated (LongNet, `dilated`) and LSH (Reformer, `lsh`). The dense-pattern
ones share the options (`AttentionOptions`), projections and position
schemes of `attention`; all share the kernel in
`layers.kernels.block_sparse`: a mixer only says which key blocks a query
block reads (a table) and the exact mask inside those blocks, so no L x L
score matrix is ever formed. They run eagerly as any module does; callers
jit (the trainer, `arches.generate`, the tests).

Each pattern is written in absolute key indices, so the full call and the
incremental call run the same code: the incremental call passes the cache
(or the unrolled ring) as keys and the first query's key index as
`q_start`. Only the strided columns and dilated segments lay the queries
out differently: by column/segment in the full form, one per block in a
piece.

Option defaults are the sizes of each pattern's paper (quoted in each
docstring); the contract suite passes its own small options so that its
16-token sequences still exercise the sparse paths (wrapped rings, several
blocks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.blocks.attention import (AttentionOptions, KVCache, QKVProjection,
                                     build_position)
from layers.kernels.block_sparse import BLOCK_SPARSE, cdiv
from layers.mixers.base import (Mixer, check_room, poison_overflow,
                                positions_for)


class Fixed(nnx.Variable):
  """Non-trainable state drawn once at init (the randomness of a sparsity
  pattern); optimizers, which update `nnx.Param`, leave it alone."""


def check_positive(who: str, **options) -> None:
  for name, value in options.items():
    if value < 1:
      raise ValueError(f"{who}: option {name} must be >= 1, got {value}")


def check_nonnegative(who: str, **options) -> None:
  for name, value in options.items():
    if value < 0:
      raise ValueError(f"{who}: option {name} must be >= 0, got {value}")


def pos_meta(pos: jax.Array) -> jax.Array:
  """Positions [L] or [B, L] as kernel metadata [1|B, 1, L]."""
  return pos.reshape(-1, 1, pos.shape[-1]).astype(jnp.int32)


def causal(qm, km):
  return (km["pos"] >= 0) & (km["pos"] <= qm["pos"])


def in_window(qm, km, window: int):
  """Keys t-window+1..t: `window` keys including the query itself (the
  HuggingFace Mistral convention, kv_idx > q_idx - sliding_window)."""
  d = qm["pos"] - km["pos"]
  return (km["pos"] >= 0) & (d >= 0) & (d < window)


def window_table(window: int, block: int):
  """Key blocks holding indices i-window+1..i for every i of a query block
  (query and key blocks of the same size, aligned)."""
  n = cdiv(window - 1, block) + 1
  return lambda qb: qb[:, None] - (n - 1) + jnp.arange(n, dtype=jnp.int32)


def own_block(qb):
  return qb[:, None]


def one_block(qb):
  return jnp.zeros((qb.shape[0], 1), jnp.int32)


class BlockSparseMixer(Mixer):
  """Kernel choice and a position scheme, shared by every mixer built on
  `layers.kernels.block_sparse`.

  A scheme's q/k transforms are applied by the mixers; a distance bias
  (ALiBi) is added inside the gathered blocks from the "pos" metadata
  (true token positions; a part that sees keys from another position, as
  the StreamingLLM sinks do, gives the query's as "bias_pos")."""

  kernel_ops = {"kernel": BLOCK_SPARSE}
  # False where "pos" metadata is not the token position (LSH sorts by hash).
  distance_bias_ok: bool = True

  def __init__(self, *, num_heads: int, head_dim: int, position: str | dict,
               kernel: str):
    self.num_heads, self.head_dim = num_heads, head_dim
    self.kernel = kernel
    self.position = build_position(position, head_dim, num_heads)
    probe = jnp.zeros((1, 1), jnp.int32)
    self.has_bias = self.position.bias(probe, probe) is not None
    by_distance = self.position.distance_bias(jnp.zeros((1, 1, 1))) is not None
    if self.has_bias and not (by_distance and self.distance_bias_ok):
      raise ValueError(
          f"{self.name}: position scheme {position!r} adds a score bias "
          "that this mixer cannot apply (only distance biases such as "
          "'alibi', and not in lsh); use one that transforms q/k only "
          "('rope', 'none', ...)")

  @property
  def name(self) -> str:
    return type(self).registered_name

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    if cache is not None:
      self.check_cache(x, cache)
    return self.forward(x, cache, segment_ids)

  def check_cache(self, x, cache) -> None:
    """Checks on the cache position (they bite where it is concrete, in
    eager calls). None here: a bounded cache takes any number of tokens."""

  def forward(self, x, cache, segment_ids):
    """The mixer call after argument checks."""
    raise NotImplementedError

  def attend(self, q, k, v, **pattern):
    impl = BLOCK_SPARSE.choose(self.kernel, dtype=q.dtype, head_dim=self.head_dim)
    if self.has_bias:
      pattern["bias_fn"] = self._distance_bias
    return impl.fn(q, k, v, **pattern)

  def _distance_bias(self, qm, km):
    return self.position.distance_bias(qm.get("bias_pos", qm["pos"]) - km["pos"])


class SparseAttention(BlockSparseMixer):
  """Block-sparse attention with the options (`AttentionOptions`) and the
  GQA projections of `attention`."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, attn: AttentionOptions):
    H, G, K = attn.heads(d_model)
    super().__init__(num_heads=H, head_dim=K, position=attn.position,
                     kernel=attn.kernel)
    self.num_kv_heads = G
    self.proj = QKVProjection(d_model, H, G, K, rngs=rngs,
                              use_bias=attn.use_bias, out_bias=attn.out_bias)

  def flops_for_keys(self, keys_per_query: float) -> float:
    """Projections plus q.k and p.v over the keys each query's blocks hold
    (masked entries inside gathered blocks are computed, so they count)."""
    return (self.proj.flops_per_token()
            + 4.0 * self.num_heads * self.head_dim * keys_per_query)


# -- patterns that reach arbitrarily far back: a full KV cache ---------------


class FarSparse(SparseAttention):
  """Patterns whose keys reach back to the start (strided, BigBird globals,
  ...): the incremental form keeps the full `KVCache` of `attention`, and
  both forms call `mix` with keys at their absolute positions."""

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    return KVCache.zeros(batch_size, max_len, self.num_kv_heads, self.head_dim,
                         dtype)

  def check_cache(self, x, cache):
    check_room(cache.pos, x.shape[1], cache.max_len, self.name)

  def forward(self, x, cache, segment_ids):
    L = x.shape[1]
    q, k, v = self.proj.q(x), self.proj.k(x), self.proj.v(x)
    pos = positions_for(x, 0 if cache is None else cache.pos)
    q, k = self.position.queries(q, pos), self.position.keys(k, pos)
    if cache is None:
      return self.proj.o(self.mix(q, k, v, 0, full=True))
    new = cache.append(k, v)
    o = self.mix(q, new.k.astype(q.dtype), new.v.astype(q.dtype), cache.pos,
                 full=False)
    return poison_overflow(self.proj.o(o), cache.pos, L, cache.max_len), new

  def mix(self, q, k, v, q_start, full: bool):
    """Attention output [B, Lq, H, K] for queries at q_start.. over keys at
    positions 0..S-1; `full` when q and k are the same whole sequence."""
    raise NotImplementedError

  @staticmethod
  def metas(q, k, q_start):
    return ({"pos": pos_meta(q_start + jnp.arange(q.shape[1]))},
            {"pos": pos_meta(jnp.arange(k.shape[1]))})
