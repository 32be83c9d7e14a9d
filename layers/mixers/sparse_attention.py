"""Sparse softmax attention: fixed sparsity patterns computed block-sparsely.

Sliding window, attention sinks, strided/fixed (Sparse Transformer), BigBird
and dilated (LongNet) attention; LSH (Reformer) is in `layers.mixers.lsh`.
They share the projections and position schemes of `attention` and the
kernel in `layers.kernels.block_sparse`: a mixer only says which key blocks
a query block reads (a table) and the exact mask inside those blocks, so no
L x L score matrix is ever formed.

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

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.kernels.block_sparse import BLOCK_SPARSE, cdiv, merge
from layers.mixers import register
from layers.mixers.attention import (Attention, KVCache, QKVProjection,
                                     build_position, resolve_heads)
from layers.mixers.base import (Mixer, MixerInfo, check_room, poison_overflow,
                                positions_for)
from layers.positions import segment_positions


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

  # False where "pos" metadata is not the token position (LSH sorts by hash).
  distance_bias_ok: bool = True

  def __init__(self, *, num_heads: int, head_dim: int, position: str | dict,
               kernel: str):
    self.num_heads, self.head_dim = num_heads, head_dim
    if kernel != "auto" and kernel not in BLOCK_SPARSE.names():
      raise ValueError(f"{self.name}: unknown block_sparse kernel {kernel!r}; "
                       f"choose 'auto' or one of {BLOCK_SPARSE.names()}")
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
    """Checks on the concrete cache position, made before tracing. None
    here: a bounded cache takes any number of tokens."""

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
  """Block-sparse attention with the GQA projections of `attention`."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_heads: int,
               num_kv_heads: int | None, head_dim: int | None,
               position: str | dict, kernel: str, use_bias: bool,
               out_bias: bool = False):
    num_kv_heads, head_dim = resolve_heads(d_model, num_heads, num_kv_heads,
                                           head_dim)
    super().__init__(num_heads=num_heads, head_dim=head_dim, position=position,
                     kernel=kernel)
    self.num_kv_heads = num_kv_heads
    self.proj = QKVProjection(d_model, num_heads, num_kv_heads, head_dim,
                              rngs=rngs, use_bias=use_bias, out_bias=out_bias)

  def flops_for_keys(self, keys_per_query: float) -> float:
    """Projections plus q.k and p.v over the keys each query's blocks hold
    (masked entries inside gathered blocks are computed, so they count)."""
    return (self.proj.flops_per_token()
            + 4.0 * self.num_heads * self.head_dim * keys_per_query)


# -- sliding window and attention sinks ----------------------------------------


@struct.dataclass
class RingCache:
  """The last `window` keys (position-encoded) and values in a ring, slot =
  position mod window, plus the first `sinks` keys and values.

  k, v: [B, window, kv_heads, head_dim]; sink_k, sink_v: [B, sinks, kv_heads,
  head_dim] (sinks = 0 for plain sliding windows); pos: int32 scalar, tokens
  seen so far.
  """
  k: jax.Array
  v: jax.Array
  sink_k: jax.Array
  sink_v: jax.Array
  pos: jax.Array


@register("sliding_window")
class SlidingWindow(SparseAttention):
  """Sliding-window (local) causal attention: Longformer (Beltagy et al.,
  2020, arXiv:2004.05150) and Mistral 7B (Jiang et al., 2023,
  arXiv:2310.06825).

  o_t = sum_{t-W < s <= t} softmax_s(q_t . k_s / sqrt(K)) v_s: each query
  sees `window` = W keys including itself (HuggingFace Mistral's
  convention). Computed blockwise: a query block of `block_size` reads its
  own and the ceil((W-1)/block_size) previous key blocks.

  Cost: training O(L W d) time and memory (linear in L); decode O(W) per
  token with a ring buffer of W keys/values, independent of the sequence
  length, so the incremental call accepts any number of tokens. Positions
  keep counting (RoPE angles are computed in fp32 and lose precision only
  after ~1e6 tokens).

  Options: window (default 4096, Mistral 7B's; Longformer's windows are
  32-512); block_size (default min(window, 128)); num_heads, num_kv_heads,
  head_dim, position, kernel, use_bias, out_bias as for `attention`.
  """

  info = MixerInfo(family="attention", paper="Beltagy et al. 2020, "
                   "arXiv:2004.05150; Jiang et al. 2023, arXiv:2310.06825",
                   train_cost="linear", decode_state="bounded",
                   supports_segments=True)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, window: int = 4096,
               block_size: int | None = None, num_heads: int = 4,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               position: str | dict = "rope", kernel: str = "auto",
               use_bias: bool = False, out_bias: bool = False):
    super().__init__(d_model, rngs=rngs, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim,
                     position=position, kernel=kernel, use_bias=use_bias,
                     out_bias=out_bias)
    # 128 keeps the waste of the first gathered block small for long windows.
    block_size = min(window, 128) if block_size is None else block_size
    check_positive(self.name, window=window, block_size=block_size)
    self.window, self.block = window, block_size
    self.sinks = 0

  def _window_part(self, q, k, v, q_meta, k_meta, q_start):
    def mask(qm, km):
      keep = in_window(qm, km, self.window)
      return keep & (qm["seg"] == km["seg"]) if "seg" in qm else keep
    return self.attend(q, k, v, table_fn=window_table(self.window, self.block),
                       mask_fn=mask, q_meta=q_meta, k_meta=k_meta,
                       block_q=self.block, block_k=self.block, q_start=q_start)

  def _sink_part(self, q_raw, sink_k, sink_v, q_pos):
    """Sinks the window no longer covers, seen as StreamingLLM sees them:
    from the query's position in the cache, min(t, sinks + window - 1),
    while sink keys keep their own positions 0..sinks-1."""
    q_cache_pos = jnp.minimum(q_pos, self.sinks + self.window - 1)
    q = self.position.queries(q_raw, q_cache_pos)
    return self.attend(
        q, sink_k, sink_v, table_fn=one_block,
        mask_fn=lambda qm, km: qm["pos"] - km["pos"] >= self.window,
        q_meta={"pos": pos_meta(q_pos), "bias_pos": pos_meta(q_cache_pos)},
        k_meta={"pos": pos_meta(jnp.arange(sink_k.shape[1]))},
        block_q=self.block, block_k=self.sinks)

  def forward(self, x, cache, segment_ids):
    q, k, v = self.proj.q(x), self.proj.k(x), self.proj.v(x)
    if cache is None:
      return self.proj.o(self._full(q, k, v, segment_ids))
    return self._step(q, k, v, cache)

  def _full(self, q, k, v, segment_ids):
    meta = {"pos": pos_meta(jnp.arange(q.shape[1]))}
    if segment_ids is None:
      pos = positions_for(q)
    else:
      pos = segment_positions(segment_ids)
      meta["seg"] = segment_ids[:, None]
    qr, kr = self.position.queries(q, pos), self.position.keys(k, pos)
    parts = [self._window_part(qr, kr, v, meta, meta, 0)]
    if self.sinks:
      parts.append(self._sink_part(q, kr[:, :self.sinks], v[:, :self.sinks], pos))
    return merge(parts)

  def _step(self, q, k, v, cache):
    L, W, S = q.shape[1], self.window, self.sinks
    pos = positions_for(q, cache.pos)
    qr = self.position.queries(q, pos)
    kr = self.position.keys(k, pos).astype(cache.k.dtype)
    v = v.astype(cache.v.dtype)
    # The ring unrolled oldest first, then the piece: keys at consecutive
    # positions cache.pos - W .. cache.pos + L - 1; the queries start at W.
    past = cache.pos - W + jnp.arange(W, dtype=jnp.int32)
    keys = jnp.concatenate([jnp.take(cache.k, past % W, axis=1), kr], axis=1)
    vals = jnp.concatenate([jnp.take(cache.v, past % W, axis=1), v], axis=1)
    k_pos = jnp.concatenate([jnp.where(past >= 0, past, -1), pos[0]])
    parts = [self._window_part(qr, keys.astype(q.dtype), vals.astype(q.dtype),
                               {"pos": pos_meta(pos)}, {"pos": pos_meta(k_pos)}, W)]
    sink_k, sink_v = cache.sink_k, cache.sink_v
    if S:
      # Piece tokens at positions < S enter the sink slots.
      src = jnp.arange(S) - cache.pos
      fresh = ((src >= 0) & (src < L))[None, :, None, None]
      src = jnp.clip(src, 0, L - 1)
      sink_k = jnp.where(fresh, jnp.take(kr, src, axis=1), sink_k)
      sink_v = jnp.where(fresh, jnp.take(v, src, axis=1), sink_v)
      parts.append(self._sink_part(q, sink_k.astype(q.dtype),
                                   sink_v.astype(q.dtype), pos))
    # Slot s of the new ring holds the newest position p with p % W == s.
    last = L + (jnp.arange(W) - cache.pos - L) % W
    new = RingCache(jnp.take(keys, last, axis=1), jnp.take(vals, last, axis=1),
                    sink_k, sink_v, cache.pos + L)
    return self.proj.o(merge(parts)), new

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    del max_len  # the ring does not depend on it
    def zeros(n):
      return jnp.zeros((batch_size, n, self.num_kv_heads, self.head_dim), dtype)
    return RingCache(zeros(self.window), zeros(self.window), zeros(self.sinks),
                     zeros(self.sinks), jnp.zeros((), jnp.int32))

  def flops_per_token(self, seq_len):
    window_keys = (cdiv(self.window - 1, self.block) + 1) * self.block
    return self.flops_for_keys(window_keys + self.sinks)


@register("attention_sinks")
class AttentionSinks(SlidingWindow):
  """Attention sinks, StreamingLLM (Xiao et al., 2023, arXiv:2309.17453):
  sliding-window attention that also keeps the first `sinks` tokens.

  o_t = softmax over {s : t-W < s <= t} u {j < sinks} of q.k / sqrt(K).
  Positions follow the paper's cache positions: the cache holds the sinks
  then the last W tokens, and scores use positions within it. For the
  relative schemes supported here (RoPE, none) that equals original
  positions for window keys, while a sink key j that the window no longer
  covers is seen at distance min(t, sinks+W-1) - j; so sink scores use
  queries rotated at min(t, sinks+W-1) and keys keep positions 0..sinks-1.
  Both parts are computed blockwise and merged by their softmax
  denominators (the union is disjoint).

  Cost: training O(L (W + sinks) d); decode O(W + sinks) per token with a
  bounded cache (ring of W plus sinks slots). No packed sequences: the sinks
  are the first tokens of the row.

  Options: window (default 1020), sinks (default 4: the paper's four
  sink tokens beside a 1020-token window, a 1024-slot cache), block_size;
  the rest as for `attention`.
  """

  info = MixerInfo(family="attention", paper="Xiao et al. 2023, "
                   "arXiv:2309.17453", train_cost="linear",
                   decode_state="bounded", supports_segments=False)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, window: int = 1020,
               sinks: int = 4, block_size: int | None = None,
               num_heads: int = 4, num_kv_heads: int | None = None,
               head_dim: int | None = None, position: str | dict = "rope",
               kernel: str = "auto", use_bias: bool = False):
    super().__init__(d_model, rngs=rngs, window=window, block_size=block_size,
                     num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, position=position, kernel=kernel,
                     use_bias=use_bias)
    check_positive(self.name, sinks=sinks)
    self.sinks = sinks


# -- patterns that reach arbitrarily far back: a full KV cache ---------------


class FarSparse(SparseAttention):
  """Patterns whose keys reach back to the start (strided, BigBird globals,
  ...): the incremental form keeps the full `KVCache` of `attention`, and
  both forms call `mix` with keys at their absolute positions."""

  init_cache = Attention.init_cache

  def check_cache(self, x, cache):
    check_room(cache.pos, x.shape[1], cache.max_len, self.name)

  def forward(self, x, cache, segment_ids):
    L = x.shape[1]
    q, k, v = self.proj.q(x), self.proj.k(x), self.proj.v(x)
    pos = positions_for(x, 0 if cache is None else cache.pos)
    q, k = self.position.queries(q, pos), self.position.keys(k, pos)
    if cache is None:
      return self.proj.o(self.mix(q, k, v, 0, full=True))
    at = (0, cache.pos, 0, 0)
    k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at)
    v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at)
    o = self.mix(q, k_all.astype(q.dtype), v_all.astype(q.dtype), cache.pos,
                 full=False)
    y = poison_overflow(self.proj.o(o), cache.pos, L, cache.max_len)
    return y, KVCache(k_all, v_all, cache.pos + L)

  def mix(self, q, k, v, q_start, full: bool):
    """Attention output [B, Lq, H, K] for queries at q_start.. over keys at
    positions 0..S-1; `full` when q and k are the same whole sequence."""
    raise NotImplementedError

  @staticmethod
  def metas(q, k, q_start):
    return ({"pos": pos_meta(q_start + jnp.arange(q.shape[1]))},
            {"pos": pos_meta(jnp.arange(k.shape[1]))})


@register("strided")
class Strided(FarSparse):
  """Sparse Transformer attention (Child et al., 2019, arXiv:1904.10509),
  causal, the two factorised patterns merged into one head set ("merged
  head" in the paper), with stride l:

    pattern="strided": keys t-l < s <= t, and s = t - k l (k >= 1);
    pattern="fixed":   keys in t's own block of l, and the last `summary`
                       positions of every earlier block.

  o_t is the softmax over that union. Local parts read one or two key
  blocks of l; the strided column is laid out column by column (one key
  block per column), the fixed summaries are gathered into one block.

  Cost: each query reads ~2l + L/l (strided) or l + summary*L/l (fixed)
  keys, so training is O(L^2/l): quadratic at a fixed stride, O(L sqrt(L))
  only when l grows like sqrt(L) as in the paper. The columns and
  summaries reach back to the start, so decode keeps the full KV cache
  (O(L) memory; O(l + L/l) keys read per token).

  Options: stride, pattern ("fixed" | "strided"), summary (fixed only,
  1..stride); defaults are the paper's enwik8 model: fixed, stride 128,
  summary 32. The rest as for `attention`.
  """

  info = MixerInfo(family="attention", paper="Child et al. 2019, "
                   "arXiv:1904.10509", train_cost="quadratic",
                   decode_state="length", supports_segments=False)
  PATTERNS = ("fixed", "strided")

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, stride: int = 128,
               pattern: str = "fixed", summary: int = 32, num_heads: int = 4,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               position: str | dict = "rope", kernel: str = "auto",
               use_bias: bool = False):
    super().__init__(d_model, rngs=rngs, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim,
                     position=position, kernel=kernel, use_bias=use_bias)
    if pattern not in self.PATTERNS:
      raise ValueError(f"strided: unknown pattern {pattern!r}; choose one of "
                       f"{self.PATTERNS}")
    check_positive(self.name, stride=stride, summary=summary)
    if summary > stride:
      raise ValueError(f"strided: summary={summary} must be <= stride={stride}")
    self.stride, self.pattern, self.summary = stride, pattern, summary

  def mix(self, q, k, v, q_start, full):
    l = self.stride
    qm, km = self.metas(q, k, q_start)
    if self.pattern == "strided":
      local = self.attend(q, k, v, table_fn=window_table(l, l),
                          mask_fn=functools.partial(in_window, window=l),
                          q_meta=qm, k_meta=km, block_q=l, block_k=l,
                          q_start=q_start)
      return merge([local, self._columns(q, k, v, qm, q_start, full)])
    local = self.attend(q, k, v, table_fn=own_block, mask_fn=causal,
                        q_meta=qm, k_meta=km, block_q=l, block_k=l,
                        q_start=q_start)
    return merge([local, self._summaries(q, k, v, qm, q_start)])

  def _columns(self, q, k, v, qm, q_start, full):
    """Keys s = t - k l, k >= 1: the sequence as rows of l, read by column.
    Keys are laid out column-major so that a column is one key block; the
    full form lays the queries out the same way (one query block per
    column), an incremental piece reads its column per query."""
    l, S = self.stride, k.shape[1]
    rows = cdiv(S, l)
    col_pos = (jnp.arange(l)[:, None] + l * jnp.arange(rows)).reshape(-1)
    col_pos = jnp.where(col_pos < S, col_pos, -1)
    lay = lambda x: jnp.take(x, jnp.maximum(col_pos, 0), axis=1)
    km = {"pos": pos_meta(col_pos)}
    earlier = lambda qm, km: (km["pos"] >= 0) & (km["pos"] < qm["pos"])
    if not full:
      return self.attend(q, lay(k), lay(v), table_fn=lambda qb: (qb % l)[:, None],
                         mask_fn=earlier, q_meta=qm, k_meta=km, block_q=1,
                         block_k=rows, q_start=q_start)
    o, lse = self.attend(lay(q), lay(k), lay(v), table_fn=own_block,
                         mask_fn=earlier, q_meta=km, k_meta=km, block_q=rows,
                         block_k=rows)
    t = jnp.arange(S)
    back = (t % l) * rows + t // l
    return jnp.take(o, back, axis=1), jnp.take(lse, back, axis=1)

  def _summaries(self, q, k, v, qm, q_start):
    """The last `summary` positions of every earlier block, gathered into
    one key block."""
    l, c, S = self.stride, self.summary, k.shape[1]
    pos = (l * jnp.arange(cdiv(S, l))[:, None] + l - c + jnp.arange(c)).reshape(-1)
    pos = jnp.where(pos < S, pos, -1)
    take = lambda x: jnp.take(x, jnp.maximum(pos, 0), axis=1)
    return self.attend(
        q, take(k), take(v), table_fn=one_block,
        mask_fn=lambda qm, km: (km["pos"] >= 0) & (km["pos"] // l < qm["pos"] // l),
        q_meta=qm, k_meta={"pos": pos_meta(pos)}, block_q=l,
        block_k=pos.shape[0], q_start=q_start)

  def flops_per_token(self, seq_len):
    blocks = cdiv(seq_len, self.stride)
    if self.pattern == "strided":
      keys = (cdiv(self.stride - 1, self.stride) + 1) * self.stride + blocks
    else:
      keys = self.stride + self.summary * blocks
    return self.flops_for_keys(keys)


def random_blocks(key_data, qb, lo, hi, count: int, heads: int):
  """`count` distinct blocks drawn from [lo, hi[b]) for every head h and
  query block b: [heads, Q, count] (Floyd's algorithm; the modulo bias is
  below 2^-20 for < 4096 blocks), -1 where fewer exist. A pure function of
  (key, h, b), so every call and every form draws the same blocks."""
  if count == 0:
    return jnp.zeros((heads, qb.shape[0], 0), jnp.int32)
  key = jax.random.wrap_key_data(key_data)
  draw = lambda h, b: jax.random.bits(
      jax.random.fold_in(jax.random.fold_in(key, h), b), (count,))
  bits = jax.vmap(lambda h: jax.vmap(lambda b: draw(h, b))(qb))(
      jnp.arange(heads))  # [heads, Q, count]
  chosen = []
  for j in range(count):
    m = hi - lo - count + j  # Floyd: draw t in [0, m]; if taken, take m
    t = (bits[..., j] % jnp.maximum(m + 1, 1).astype(jnp.uint32)).astype(jnp.int32)
    taken = functools.reduce(jnp.logical_or, [t == c for c in chosen],
                             jnp.zeros_like(t, bool))
    chosen.append(jnp.where(m >= 0, jnp.where(taken, m, t), -1))
  chosen = jnp.stack(chosen, axis=-1)
  return jnp.where(chosen >= 0, lo + chosen, -1).astype(jnp.int32)


@register("bigbird")
class BigBird(FarSparse):
  """BigBird block-sparse attention (Zaheer et al., 2020, arXiv:2007.14062),
  causal (as for decoders): query block i reads

    its own block and the `window` blocks before it,
    the first `global_blocks` blocks (global tokens),
    `random_blocks` blocks drawn from the rest of its past, per head (as
    in the paper, each head draws its own),

  with a causal mask inside; o_t is the softmax over those keys. The random
  choice is fixed at init from `rngs` (a stored key, not a parameter) and is
  a function of the (head, block) index, so any sequence length works and
  the full and incremental forms agree. Causal global tokens see only their
  past, which lies in the global blocks themselves.

  Cost: (window + 1 + global + random) * block_size keys per query, so
  training is O(L) (linear). The global and random blocks reach back
  arbitrarily far, so decode keeps the full KV cache (O(L) memory, a
  constant number of key blocks read per token). With random blocks and
  grouped kv heads, every query head gathers its own key blocks.

  Options: block_size, window, global_blocks, random_blocks; defaults are
  BigBird-ITC's: blocks of 64, a window of 3 blocks (its causal half: the
  own block and 1 before), 2 global and 3 random blocks. The rest as for
  `attention`.
  """

  info = MixerInfo(family="attention", paper="Zaheer et al. 2020, "
                   "arXiv:2007.14062", train_cost="linear",
                   decode_state="length", supports_segments=False)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, block_size: int = 64,
               window: int = 1, global_blocks: int = 2, random_blocks: int = 3,
               num_heads: int = 4, num_kv_heads: int | None = None,
               head_dim: int | None = None, position: str | dict = "rope",
               kernel: str = "auto", use_bias: bool = False):
    super().__init__(d_model, rngs=rngs, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim,
                     position=position, kernel=kernel, use_bias=use_bias)
    check_positive(self.name, block_size=block_size)
    check_nonnegative(self.name, window=window, global_blocks=global_blocks,
                      random_blocks=random_blocks)
    self.block, self.window = block_size, window
    self.global_blocks, self.random_blocks = global_blocks, random_blocks
    self.pattern_key = Fixed(jax.random.key_data(rngs.params()))

  def table(self, qb):
    """[H, Q, N] block table (one per head), or [Q, N] for all heads when
    no random blocks are drawn."""
    w, g = self.window, self.global_blocks
    first_local = qb[:, None] - w
    local = first_local + jnp.arange(w + 1, dtype=jnp.int32)
    glob = jnp.arange(g, dtype=jnp.int32)[None, :]
    glob = jnp.where(glob < first_local, glob, -1)  # else in the window
    shared = jnp.concatenate([glob, local], axis=1)
    if not self.random_blocks:
      return shared
    H = self.num_heads
    rand = random_blocks(self.pattern_key[...], qb, g, qb - w,
                         self.random_blocks, H)
    return jnp.concatenate([jnp.broadcast_to(shared, (H, *shared.shape)), rand],
                           axis=-1)

  def mix(self, q, k, v, q_start, full):
    qm, km = self.metas(q, k, q_start)
    return self.attend(q, k, v, table_fn=self.table, mask_fn=causal, q_meta=qm,
                       k_meta=km, block_q=self.block, block_k=self.block,
                       q_start=q_start)[0]

  def flops_per_token(self, seq_len):
    blocks = self.window + 1 + self.global_blocks + self.random_blocks
    return self.flops_for_keys(blocks * self.block)


@register("dilated")
class Dilated(FarSparse):
  """Dilated attention, LongNet (Ding et al., 2023, arXiv:2307.02486),
  causal.

  For each branch (w, r) of segment_lengths x dilation_rates the sequence is
  cut into segments of w; in every segment, head h keeps every r-th
  position starting at offset h mod r (the paper's per-head shift) and
  runs causal softmax attention among them. Branches are merged
  by their softmax denominators, o = sum_i s_i o_i / sum_i s_i, as in the
  paper (a key found by two branches counts twice). A position that a
  branch skips for a head gets nothing from it; a rate of 1 is required so
  that every position is covered.

  Computed blockwise: a head's kept positions of one segment form one
  block. Cost: a branch costs w / r^2 keys per query, so training is O(L)
  (linear) for fixed (w, r). Keys never reach back more than max(w) - 1
  positions, so a ring of that size would bound decode memory; this
  implementation keeps the full KV cache (O(L) memory, O(sum w/r) keys read
  per token).

  Options: segment_lengths, dilation_rates (same length, r divides w, one
  rate 1); defaults (2048, 4096, 8192) x (1, 2, 4) are the first three
  branches of the paper's language-model setting (w up to 32768 with
  r = 1, 2, 4, 6, 12; r = 6 does not divide 16384 here). The rest as for
  `attention`.
  """

  info = MixerInfo(family="attention", paper="Ding et al. 2023, "
                   "arXiv:2307.02486", train_cost="linear",
                   decode_state="length", supports_segments=False)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs,
               segment_lengths: tuple[int, ...] = (2048, 4096, 8192),
               dilation_rates: tuple[int, ...] = (1, 2, 4), num_heads: int = 4,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               position: str | dict = "rope", kernel: str = "auto",
               use_bias: bool = False):
    super().__init__(d_model, rngs=rngs, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim,
                     position=position, kernel=kernel, use_bias=use_bias)
    if not segment_lengths or len(segment_lengths) != len(dilation_rates):
      raise ValueError(
          f"dilated: segment_lengths {tuple(segment_lengths)} and "
          f"dilation_rates {tuple(dilation_rates)} must be non-empty and of "
          "the same length (one (w, r) per branch)")
    for w, r in zip(segment_lengths, dilation_rates):
      check_positive(self.name, segment_length=w, dilation_rate=r)
      if w % r:
        raise ValueError(f"dilated: dilation rate {r} must divide segment "
                         f"length {w}")
    if 1 not in dilation_rates:
      raise ValueError(f"dilated: dilation_rates {tuple(dilation_rates)} need a "
                       "rate of 1, else some (position, head) sees no key")
    self.branches = tuple(zip(segment_lengths, dilation_rates))

  def mix(self, q, k, v, q_start, full):
    k = jnp.repeat(k, self.num_heads // self.num_kv_heads, axis=2)
    v = jnp.repeat(v, self.num_heads // self.num_kv_heads, axis=2)
    return merge([self._branch(q, k, v, q_start, full, w, r)
                  for w, r in self.branches])

  def _branch(self, q, k, v, q_start, full, w, r):
    """One (w, r): keys laid out per head, a segment's kept positions as one
    block. The full form lays queries out the same way; an incremental
    piece reads its segment's block per query."""
    S, H = k.shape[1], self.num_heads
    seg = w if S > w else cdiv(S, r) * r  # a lone segment needs no more
    per = seg // r
    shift = jnp.arange(H) % r  # [H]
    lay_pos = (seg * jnp.arange(cdiv(S, seg))[:, None, None]
               + r * jnp.arange(per)[None, :, None] + shift).reshape(-1, H)
    lay_pos = jnp.where(lay_pos < S, lay_pos, -1)  # [n, H]
    lay = lambda x: jnp.take_along_axis(
        x, jnp.maximum(lay_pos, 0)[None, :, :, None], axis=1)
    km = {"pos": lay_pos.T[None]}
    if not full:
      t = q_start + jnp.arange(q.shape[1])
      kept = ((t % w) % r)[None, :] == shift[:, None]  # [H, Lq]
      return self.attend(
          q, lay(k), lay(v), table_fn=lambda qb: (qb // w)[:, None],
          mask_fn=lambda qm, km: qm["kept"] & causal(qm, km),
          q_meta={"pos": pos_meta(t), "kept": kept[None]}, k_meta=km,
          block_q=1, block_k=per, q_start=q_start)
    o, lse = self.attend(lay(q), lay(k), lay(v), table_fn=own_block,
                         mask_fn=causal, q_meta=km, k_meta=km, block_q=per,
                         block_k=per)
    t = jnp.arange(S)[:, None]
    back = (t // seg) * per + (t % seg) // r  # [S, H]
    kept = (t % seg) % r == shift
    o = jnp.take_along_axis(o, back[None, :, :, None], axis=1)
    lse = jnp.take_along_axis(lse, back[None], axis=1)
    return jnp.where(kept[..., None], o, 0), jnp.where(kept, lse, -jnp.inf)

  def flops_per_token(self, seq_len):
    keys = sum(min(w, seq_len) / r ** 2 for w, r in self.branches)
    return self.flops_for_keys(keys)
