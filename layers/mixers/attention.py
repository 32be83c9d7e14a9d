"""Dense causal softmax attention with grouped KV heads."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from layers import positions
from layers.blocks.attention import (AttentionOptions, KVCache, QKVProjection,
                                     build_position)
from layers.kernels import context_parallel
from layers.kernels.attention import ATTENTION, attend
from layers.mixers import register
from layers.mixers.base import (Mixer, MixerInfo, check_room, poison_overflow,
                                positions_for)


@register("attention")
class Attention(Mixer):
  """Multi-head softmax attention (Vaswani et al., 2017, "Attention Is All
  You Need") with grouped KV heads (GQA, Ainslie et al., 2023; MQA,
  Shazeer, 2019).

  o_t = sum_{s<=t} softmax_s(q_t . k_s / sqrt(K)) v_s, with num_heads query
  heads sharing num_kv_heads key/value heads (MHA when equal, MQA at 1).

  Cost: training O(L^2 d) time, about half of it skipped by causality, and
  O(L d) memory: the kernels (`layers.kernels.attention`) work block by
  block, take causality, segments and ALiBi slopes as positions and ids,
  and never build an L x L mask or score matrix; the backward recomputes
  the scores. Decode O(L) per token over the filled part of a KV cache of
  2 * max_len * num_kv_heads * head_dim values. Split along the length (a
  "sequence" mesh axis > 1) a full-sequence call is ring attention
  (`layers.kernels.context_parallel`) over the blockwise kernel, whatever
  `kernel` names.

  Options (`AttentionOptions`): num_heads, num_kv_heads, head_dim,
  position (a score bias must be linear in distance, i.e. the scheme has
  `slopes()`, as ALiBi), kernel ("auto" or one of
  `layers.kernels.attention.ATTENTION.names()`), use_bias, out_bias.
  """

  info = MixerInfo(family="attention", paper="Vaswani et al. 2017, "
                   "arXiv:1706.03762", train_cost="quadratic",
                   decode_state="length", supports_segments=True,
                   tensor_parallel=True, sequence_parallel=True)
  kernel_ops = {"kernel": ATTENTION}

  def __init__(self, d_model: int, *, rngs: nnx.Rngs,
               attn: AttentionOptions = AttentionOptions()):
    H, G, K = attn.heads(d_model)
    self.num_heads, self.num_kv_heads, self.head_dim = H, G, K
    self.kernel = attn.kernel
    self.proj = QKVProjection(d_model, H, G, K, rngs=rngs,
                              use_bias=attn.use_bias, out_bias=attn.out_bias)
    self.position = build_position(attn.position, K, H)
    probe = jnp.zeros((1, 1), jnp.int32)
    if (self.position.bias(probe, probe) is not None
        and self.position.slopes() is None):
      raise ValueError(
          f"attention: position {attn.position!r} adds a score bias that is "
          "not -slope * distance; the attention kernels take only such a "
          "bias (a scheme with slopes(), e.g. 'alibi')")

  def attend(self, q, k, v, **call):
    """The ATTENTION op (`layers.kernels.attention_call` options)."""
    return attend(q, k, v, kernel=self.kernel,
                  alibi_slopes=self.position.slopes(), **call)

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    L = x.shape[1]
    q, k, v = self.proj.q(x), self.proj.k(x), self.proj.v(x)
    if cache is None:
      pos = (positions_for(x) if segment_ids is None
             else positions.segment_positions(segment_ids))
      q, k = self.position.queries(q, pos), self.position.keys(k, pos)
      layout = context_parallel.length_layout()
      if layout is None:
        o = self.attend(q, k, v, q_segment_ids=segment_ids,
                        kv_segment_ids=segment_ids)
      else:  # split along the length: ring attention
        o = context_parallel.ring_attention(
            layout, q, k, v, q_segment_ids=segment_ids,
            kv_segment_ids=segment_ids, alibi_slopes=self.position.slopes())
      return self.proj.o(o)

    check_room(cache.pos, L, cache.max_len, "attention")
    pos = positions_for(x, cache.pos)
    q, k = self.position.queries(q, pos), self.position.keys(k, pos)
    new = cache.append(k, v)
    # Causality from q_offset also hides the slots not yet written.
    o = self.attend(q, new.k.astype(q.dtype), new.v.astype(q.dtype),
                    q_offset=cache.pos)
    return poison_overflow(self.proj.o(o), cache.pos, L, cache.max_len), new

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    return KVCache.zeros(batch_size, max_len, self.num_kv_heads, self.head_dim,
                         dtype)

  def flops_per_token(self, seq_len):
    context = (seq_len + 1) / 2  # mean number of visible keys, causal
    return self.proj.flops_per_token() + 4.0 * self.num_heads * self.head_dim * context
