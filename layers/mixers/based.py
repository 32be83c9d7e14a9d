"""Based's linear attention: Taylor-feature linear attention, one of the
three layer kinds of the Based model (with BaseConv and sliding-window
attention; the published layer pattern is `configs/hybrids/based.yaml`)."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from layers.blocks.attention import resolve_heads
from layers.blocks.linear import FeatureAttention
from layers.mixers import register
from layers.mixers.base import MixerInfo


def taylor_features(x):
  """[..., F] -> [..., 1 + F + F^2] fp32 with phi(q).phi(k) = 1 + q.k/sqrt(F)
  + (q.k)^2 / (2F), the 2nd-order Taylor expansion of exp(q.k/sqrt(F))."""
  x = x.astype(jnp.float32)
  F = x.shape[-1]
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], F * F)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x * F ** -0.25,
                          outer / math.sqrt(2.0 * F)], axis=-1)


@register("based")
class Based(FeatureAttention):
  """Based linear attention (Arora et al., 2024, "Simple linear attention
  language models balance the recall-throughput tradeoff",
  arXiv:2402.18668; reference: HazyResearch/based,
  based/models/mixers/linear_attention.py, `LinearAttention` with the
  `TaylorExp` feature map).

  q, k = x W_q, x W_k (num_heads x feature_dim F), v = x W_v (num_heads x
  head_dim), no biases; phi(x) = [1, x / F^(1/4), vec(x x^T) / sqrt(2F)], so
  phi(q).phi(k) = 1 + q.k/sqrt(F) + (q.k)^2 / (2F) ~ exp(q.k/sqrt(F));

    o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / sum_{s<=t} phi(q_t).phi(k_s),

  then y = o W_o. The layer alone is the paper's linear-attention layer;
  the Based model interleaves it with BaseConv (`baseconv`) and
  sliding-window (`sliding_window`) layers, see configs/hybrids/based.yaml.

  Cost per head: training O(L (F^2 head_dim + C (F^2 + head_dim))) with
  the chunked form (chunk C); decode O(F^2 head_dim) per token with a
  constant fp32 state of (1 + F + F^2) * (head_dim + 1) values.

  Departures: the reference adds eps = 1e-12 to the denominator; here it is
  only floored at a tiny value, which is the same computation since
  phi(q).phi(k) = ((1 + q.k/sqrt(F))^2 + 1) / 2 >= 1/2 makes the denominator
  at least 1/2. Zoology's variant (`num_key_value_heads` for v) is not
  offered: the Based models use as many value heads as query heads.

  Options: num_heads (reference 16), head_dim (default d_model //
  num_heads), feature_dim F (reference and default 16); kernel ("auto", "chunked",
  "parallel", "recurrent", or a Pallas kernel on TPU/GPU) and chunk_size of the shared kernel.
  """

  info = MixerInfo(family="linear attention", paper="Arora et al. 2024, "
                   "arXiv:2402.18668", train_cost="linear",
                   decode_state="constant", supports_segments=True)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_heads: int = 4,
               head_dim: int | None = None, feature_dim: int = 16,
               kernel: str = "auto", chunk_size: int = 64):
    if feature_dim < 1:
      raise ValueError(f"based: feature_dim must be >= 1, got {feature_dim}")
    _, head_dim = resolve_heads(d_model, num_heads, None, head_dim)
    super().__init__(d_model, rngs=rngs, num_heads=num_heads,
                     key_dim=feature_dim, head_dim=head_dim, kernel=kernel,
                     chunk_size=chunk_size)
    self.feature_dim = 1 + feature_dim + feature_dim ** 2

  def mix(self, x, pos, segment_ids, state):
    o, state = self.attend(taylor_features(self.q(x)),
                           taylor_features(self.k(x)), self.v(x),
                           segment_ids, state)
    return self.o(o), state
