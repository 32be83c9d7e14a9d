"""Dense causal softmax attention with grouped KV heads."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers import positions
from layers.kernels.attention import ATTENTION, attend
from layers.mixers import register
from layers.mixers.base import (Mixer, MixerInfo, check_room, poison_overflow,
                                positions_for)
from layers.params import Dense


@struct.dataclass
class KVCache:
  """Keys (already position-encoded) and values for `max_len` slots.

  k, v: [B, max_len, kv_heads, head_dim]; pos: int32 scalar, slots filled.
  """
  k: jax.Array
  v: jax.Array
  pos: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[1]


def build_position(spec: str | Mapping, head_dim: int, num_heads: int):
  """A position scheme from "name" or {"name": ..., **options}."""
  if isinstance(spec, str):
    return positions.build(spec, head_dim, num_heads=num_heads)
  spec = dict(spec)
  if "name" not in spec:
    raise ValueError(f"position spec {spec} needs a 'name'; one of "
                     f"{positions.names()}")
  return positions.build(spec.pop("name"), head_dim, num_heads=num_heads, **spec)


class QKVProjection(nnx.Module):
  """q [B,L,H,K], k/v [B,L,G,K] and the output projection, shared by the
  softmax-attention family. use_bias adds biases to q/k/v, out_bias to the
  output projection (Griffin/RecurrentGemma has only the latter)."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, rngs: nnx.Rngs, use_bias: bool = False,
               out_bias: bool = False):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of "
                       f"num_kv_heads={num_kv_heads}")
    self.q = Dense(d_model, (num_heads, head_dim), in_axes=("embed",),
                   out_axes=("heads", "head_dim"), rngs=rngs, use_bias=use_bias)
    self.k = Dense(d_model, (num_kv_heads, head_dim), in_axes=("embed",),
                   out_axes=("kv_heads", "head_dim"), rngs=rngs, use_bias=use_bias)
    self.v = Dense(d_model, (num_kv_heads, head_dim), in_axes=("embed",),
                   out_axes=("kv_heads", "head_dim"), rngs=rngs, use_bias=use_bias)
    self.o = Dense((num_heads, head_dim), d_model, in_axes=("heads", "head_dim"),
                   out_axes=("embed",), rngs=rngs, use_bias=out_bias)

  def flops_per_token(self) -> float:
    return 2.0 * sum(m.kernel.size for m in (self.q, self.k, self.v, self.o))


def resolve_heads(d_model, num_heads, num_kv_heads, head_dim):
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by "
                       f"num_heads={num_heads}; set head_dim explicitly")
    head_dim = d_model // num_heads
  return num_kv_heads, head_dim


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
  2 * max_len * num_kv_heads * head_dim values.

  Options:
    num_heads, num_kv_heads (default num_heads), head_dim (default
    d_model // num_heads); position: a scheme name or {"name": ..., **opts}
    (see `layers.positions`; a score bias must be linear in distance, i.e.
    the scheme has `slopes()`, as ALiBi); kernel: "auto" or one of
    `layers.kernels.attention.ATTENTION.names()`; use_bias on q/k/v;
    out_bias on the output projection.
  """

  info = MixerInfo(family="attention", paper="Vaswani et al. 2017, "
                   "arXiv:1706.03762", train_cost="quadratic",
                   decode_state="length", supports_segments=True)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_heads: int = 4,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               position: str | dict = "rope", kernel: str = "auto",
               use_bias: bool = False, out_bias: bool = False):
    num_kv_heads, head_dim = resolve_heads(d_model, num_heads, num_kv_heads,
                                           head_dim)
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.kernel = kernel
    if kernel != "auto" and kernel not in ATTENTION.names():
      raise ValueError(f"unknown attention kernel {kernel!r}; choose 'auto' "
                       f"or one of {ATTENTION.names()}")
    self.proj = QKVProjection(d_model, num_heads, num_kv_heads, head_dim,
                              rngs=rngs, use_bias=use_bias, out_bias=out_bias)
    self.position = build_position(position, head_dim, num_heads)
    probe = jnp.zeros((1, 1), jnp.int32)
    if (self.position.bias(probe, probe) is not None
        and self.position.slopes() is None):
      raise ValueError(
          f"attention: position {position!r} adds a score bias that is not "
          "-slope * distance; the attention kernels take only such a bias "
          "(a scheme with slopes(), e.g. 'alibi')")

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
      o = self.attend(q, k, v, q_segment_ids=segment_ids,
                      kv_segment_ids=segment_ids)
      return self.proj.o(o)

    check_room(cache.pos, L, cache.max_len, "attention")
    pos = positions_for(x, cache.pos)
    q, k = self.position.queries(q, pos), self.position.keys(k, pos)
    start = (0, cache.pos, 0, 0)
    k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
    v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
    # Causality from q_offset also hides the slots not yet written.
    o = self.attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                    q_offset=cache.pos)
    y = poison_overflow(self.proj.o(o), cache.pos, L, cache.max_len)
    return y, KVCache(k_all, v_all, cache.pos + L)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((), jnp.int32))

  def flops_per_token(self, seq_len):
    context = (seq_len + 1) / 2  # mean number of visible keys, causal
    return self.proj.flops_per_token() + 4.0 * self.num_heads * self.head_dim * context
