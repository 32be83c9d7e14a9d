"""Reformer LSH attention, causal, on the block-sparse kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.blocks.attention import resolve_heads
from layers.blocks.sparse import (BlockSparseMixer, Fixed, check_positive,
                                  pos_meta)
from layers.kernels.block_sparse import merge
from layers.mixers import register
from layers.mixers.base import MixerInfo, positions_for
from layers.params import Dense

# Reformer's score for a token attending to itself (HF transformers uses
# the same value): shared-QK makes q_t . k_t the largest score, so it is
# used only when nothing else is visible.
SELF_SCORE_PENALTY = -1e5


@struct.dataclass
class BucketCache:
  """For every hash round and head, the `chunk` most recent keys of each
  bucket.

  k, v: [B, n_buckets * chunk, n_hashes * heads, head_dim]; bucket b owns
  slots b*chunk..(b+1)*chunk-1, oldest first, its newest key in the last
  slot. count: [B, n_hashes * heads, n_buckets] int32, keys held per bucket
  (<= chunk; the held ones are the last `count` slots). pos: int32 scalar.
  """
  k: jax.Array
  v: jax.Array
  count: jax.Array
  pos: jax.Array


@register("lsh")
class LSHAttention(BlockSparseMixer):
  """LSH attention, Reformer (Kitaev et al., 2020, arXiv:2001.04451), causal,
  with shared QK.

  x_t = W_qk h_t (position scheme applied, default none); keys are the unit
  vectors k_t = x_t / |x_t| and values v_t = W_v h_t. Each of `n_hashes`
  rounds hashes x_t with a random rotation fixed at init (angular LSH,
  bucket = argmax [x R; -x R], R of shape head_dim x n_buckets/2 per round
  and head). Within a round, o_t = softmax_s(x_t . k_s) v_s over the
  `chunk` most recent tokens s <= t of t's bucket (t itself included, at a
  score lowered by 1e5 as in Reformer, so it counts only when alone).
  Rounds are merged by their softmax denominators, as in Reformer (a key
  found by two rounds counts twice).

  Computed as in the paper: sort tokens by bucket (stably, so by position
  within a bucket), cut the sorted sequence into chunks of `chunk`, and let
  every chunk attend to itself and the previous chunk. Causal adaptation:
  Reformer lets a chunk see every token of those two chunks, so the keys of
  t would depend on how many later tokens hash into lower buckets; here t
  sees only same-bucket tokens at most chunk - 1 places before it in the
  sorted order, i.e. its bucket's last `chunk` tokens, which depends on the
  past alone.

  Cost: training O(L log L) for the sort plus O(L * 2 chunk * d) for the
  scores; decode keeps the last `chunk` keys of every bucket (bounded:
  n_hashes * heads * n_buckets * chunk keys and values), sorts them with the
  new piece and reads 2 chunks per query. Hashing runs in fp32 so that the
  bucket choice does not depend on the activation dtype.

  Options: num_heads, head_dim, n_buckets (even), chunk, n_hashes, position
  (a q/k scheme, applied before hashing), kernel, use_bias. Defaults are
  Reformer's: chunks of 64 (the paper's and HF's chunk length), 2 hash
  rounds (its enwik8 training setting) and 64 buckets (Reformer takes
  about 2 L / chunk; 64 fits L = 2048).
  """

  info = MixerInfo(family="attention", paper="Kitaev et al. 2020, "
                   "arXiv:2001.04451", train_cost="n log n",
                   decode_state="bounded", supports_segments=False)
  # Blocks hold tokens sorted by hash and heads are (round, head) pairs, so
  # a distance bias per head has no place here; schemes that rotate q/k do.
  distance_bias_ok = False

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_heads: int = 4,
               head_dim: int | None = None, n_buckets: int = 64, chunk: int = 64,
               n_hashes: int = 2, position: str | dict = "none",
               kernel: str = "auto", use_bias: bool = False):
    _, head_dim = resolve_heads(d_model, num_heads, None, head_dim)
    super().__init__(num_heads=num_heads, head_dim=head_dim, position=position,
                     kernel=kernel)
    check_positive(self.name, chunk=chunk, n_hashes=n_hashes,
                   n_buckets=n_buckets)
    if n_buckets % 2:
      raise ValueError(f"lsh: n_buckets={n_buckets} must be even (buckets are "
                       "argmax over [xR, -xR])")
    self.n_buckets, self.chunk, self.n_hashes = n_buckets, chunk, n_hashes
    heads = ("heads", "head_dim")
    self.qk = Dense(d_model, (num_heads, head_dim), in_axes=("embed",),
                    out_axes=heads, rngs=rngs, use_bias=use_bias)
    self.v = Dense(d_model, (num_heads, head_dim), in_axes=("embed",),
                   out_axes=heads, rngs=rngs, use_bias=use_bias)
    self.o = Dense((num_heads, head_dim), d_model, in_axes=heads,
                   out_axes=("embed",), rngs=rngs)
    self.rotations = Fixed(jax.random.normal(
        rngs.params(), (n_hashes, num_heads, head_dim, n_buckets // 2)))

  def buckets(self, x32):
    """[B, L, H, K] fp32 -> bucket ids [B, L, n_hashes * H], round-major."""
    rot = jnp.einsum("blhk,rhkn->blrhn", x32, self.rotations[...])
    b = jnp.argmax(jnp.concatenate([rot, -rot], -1), -1)
    return b.reshape(*b.shape[:2], -1).astype(jnp.int32)

  def forward(self, x, cache, segment_ids):
    pos = positions_for(x, 0 if cache is None else cache.pos)
    x32 = self.position.queries(self.qk(x.astype(jnp.float32)), pos)
    buckets = self.buckets(x32)
    unit = x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + 1e-6)
    rounds = lambda a: jnp.tile(a.astype(x.dtype), (1, 1, self.n_hashes, 1))
    q, k, v = rounds(x32), rounds(unit), rounds(self.v(x))
    if cache is None:
      return self.o(self._merge_rounds(*self._full(q, k, v, buckets)))
    o, lse, new = self._step(q, k, v, buckets, cache)
    return self.o(self._merge_rounds(o, lse)), new

  def _mask(self, qm, km):
    d = qm["idx"] - km["idx"]
    return (qm["bucket"] == km["bucket"]) & (d >= 0) & (d < self.chunk)

  @staticmethod
  def _self_penalty(qm, km):
    return jnp.where(qm["idx"] == km["idx"], SELF_SCORE_PENALTY, 0.0)

  def _full(self, q, k, v, buckets):
    """Sorted by bucket, every chunk attends to itself and the one before."""
    perm = jnp.argsort(buckets, axis=1, stable=True)  # [B, L, RH]
    sort = lambda a: jnp.take_along_axis(a, perm[..., None], axis=1)
    meta = {"idx": pos_meta(jnp.arange(q.shape[1])),
            "bucket": jnp.take_along_axis(buckets, perm, 1).transpose(0, 2, 1)}
    o, lse = self.attend(
        sort(q), sort(k), sort(v),
        table_fn=lambda qb: qb[:, None] - 1 + jnp.arange(2, dtype=jnp.int32),
        mask_fn=self._mask, bias_fn=self._self_penalty, q_meta=meta,
        k_meta=meta, block_q=self.chunk, block_k=self.chunk, scale=1.0)
    back = jnp.argsort(perm, axis=1)
    return (jnp.take_along_axis(o, back[..., None], axis=1),
            jnp.take_along_axis(lse, back, axis=1))

  def _step(self, q, k, v, buckets, cache):
    """The cached keys and the piece, sorted by bucket; each piece token
    reads the (at most two) chunks holding the chunk - 1 keys before it."""
    c, nb = self.chunk, self.n_buckets
    B, n, RH, K = q.shape
    held = jnp.arange(c) >= c - cache.count[..., None]  # [B, RH, nb, c]
    slot_bucket = jnp.where(held, jnp.arange(nb)[:, None], nb)  # nb: empty
    slot_bucket = slot_bucket.reshape(B, RH, nb * c).transpose(0, 2, 1)
    all_b = jnp.concatenate([slot_bucket, buckets], axis=1)  # [B, T, RH]
    perm = jnp.argsort(all_b, axis=1, stable=True)
    sort = lambda a: jnp.take_along_axis(a, perm[..., None], axis=1)
    keys = sort(jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1))
    vals = sort(jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1))
    sorted_b = jnp.take_along_axis(all_b, perm, axis=1)
    q_idx = jnp.argsort(perm, axis=1)[:, nb * c:]  # [B, n, RH]

    def one(q1, k1, v1, b1, qb1, qi1):  # one (batch, round-head)
      o, lse = self.attend(
          q1[None, :, None], k1[None, :, None], v1[None, :, None],
          table_fn=lambda i: (qi1[i] - (c - 1))[:, None] // c + jnp.arange(2),
          mask_fn=self._mask, bias_fn=self._self_penalty,
          q_meta={"idx": qi1[None, None], "bucket": qb1[None, None]},
          k_meta={"idx": pos_meta(jnp.arange(k1.shape[0])),
                  "bucket": b1[None, None]},
          block_q=1, block_k=c, scale=1.0)
      return o[0, :, 0], lse[0, :, 0]

    per_head = jax.vmap(one, in_axes=1, out_axes=(1, 1))
    o, lse = jax.vmap(per_head)(q, keys.astype(q.dtype), vals.astype(q.dtype),
                                sorted_b, buckets, q_idx)
    # Keep each bucket's last c tokens: they end at `end` in sorted order.
    count = (sorted_b[..., None] == jnp.arange(nb)).sum(1)  # [B, RH, nb]
    end = jnp.cumsum(count, -1)
    src = (end[..., None] - c + jnp.arange(c)).reshape(B, RH, nb * c)
    src = jnp.clip(src, 0, keys.shape[1] - 1).transpose(0, 2, 1)[..., None]
    new = BucketCache(jnp.take_along_axis(keys, src, axis=1),
                      jnp.take_along_axis(vals, src, axis=1),
                      jnp.minimum(count, c).astype(jnp.int32), cache.pos + n)
    return o, lse, new

  def _merge_rounds(self, o, lse):
    B, L = o.shape[:2]
    o = o.reshape(B, L, self.n_hashes, self.num_heads, self.head_dim)
    lse = lse.reshape(B, L, self.n_hashes, self.num_heads)
    return merge([(o[:, :, r], lse[:, :, r]) for r in range(self.n_hashes)])

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    del max_len  # a fixed number of keys per bucket
    rh = self.n_hashes * self.num_heads
    shape = (batch_size, self.n_buckets * self.chunk, rh, self.head_dim)
    return BucketCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                       jnp.zeros((batch_size, rh, self.n_buckets), jnp.int32),
                       jnp.zeros((), jnp.int32))

  def flops_per_token(self, seq_len):
    proj = 2.0 * sum(m.kernel.size for m in (self.qk, self.v, self.o))
    rh = self.n_hashes * self.num_heads
    hashing = 2.0 * rh * self.head_dim * (self.n_buckets // 2)
    return proj + hashing + 4.0 * rh * self.head_dim * 2 * self.chunk
