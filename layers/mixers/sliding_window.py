"""Sliding-window attention (Longformer, Mistral) and attention sinks
(StreamingLLM): a bounded ring-buffer cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.blocks.attention import AttentionOptions
from layers.blocks.sparse import (SparseAttention, check_positive, in_window,
                                  one_block, pos_meta, window_table)
from layers.kernels.block_sparse import cdiv, merge
from layers.mixers import register
from layers.mixers.base import MixerInfo, positions_for
from layers.positions import segment_positions


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
  32-512); block_size (default min(window, 128)); the attention options
  (`AttentionOptions`: num_heads, num_kv_heads, head_dim, position, kernel,
  use_bias, out_bias) as for `attention`.
  """

  info = MixerInfo(family="attention", paper="Beltagy et al. 2020, "
                   "arXiv:2004.05150; Jiang et al. 2023, arXiv:2310.06825",
                   train_cost="linear", decode_state="bounded",
                   supports_segments=True)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, window: int = 4096,
               block_size: int | None = None,
               attn: AttentionOptions = AttentionOptions()):
    super().__init__(d_model, rngs=rngs, attn=attn)
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
  the rest (`AttentionOptions`) as for `attention`.
  """

  info = MixerInfo(family="attention", paper="Xiao et al. 2023, "
                   "arXiv:2309.17453", train_cost="linear",
                   decode_state="bounded", supports_segments=False)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, window: int = 1020,
               sinks: int = 4, block_size: int | None = None,
               attn: AttentionOptions = AttentionOptions()):
    super().__init__(d_model, rngs=rngs, window=window, block_size=block_size,
                     attn=attn)
    check_positive(self.name, sinks=sinks)
    self.sinks = sinks
