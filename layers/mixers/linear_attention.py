"""Linear attention (Katharopoulos et al., 2020) and the plumbing shared by
the linear / kernelized / decayed family (performer, retnet, gla, based).

The compute core, causal linear attention with optional decay in parallel,
chunked and recurrent forms, is `layers.kernels.linear_attention`; the
mixers here add projections, feature maps, gates and the cache.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers import positions
from layers.kernels import linear_attention as kernel
from layers.mixers import register
from layers.mixers.attention import resolve_heads
from layers.mixers.base import Mixer, MixerInfo, positions_for
from layers.params import Dense, constant_init, param


@struct.dataclass
class RecurrentCache:
  """A fixed-size recurrent state, whatever max_len.

  state: the mixer's state pytree (its running sums are fp32);
  pos: int32 scalar, tokens seen (for positions and fresh-start checks).
  """
  state: Any
  pos: jax.Array


class RecurrentMixer(Mixer):
  """Call plumbing for mixers whose decode state has a fixed size.

  Subclasses define `mix(x, pos, segment_ids, state) -> (y, state)` and
  `zero_state(batch_size, dtype)`. A full call mixes from the zero state
  with positions restarting at every segment; an incremental call mixes
  from the cached state at positions after `cache.pos`.
  """

  def mix(self, x, pos, segment_ids, state):
    raise NotImplementedError

  def zero_state(self, batch_size: int, dtype) -> Any:
    raise NotImplementedError

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    if cache is None:
      pos = (positions_for(x) if segment_ids is None
             else positions.segment_positions(segment_ids))
      y, _ = self.mix(x, pos, segment_ids, self.zero_state(x.shape[0], x.dtype))
      return y
    y, state = self.mix(x, positions_for(x, cache.pos), None, cache.state)
    return y, RecurrentCache(state, cache.pos + x.shape[1])

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    del max_len  # the state does not grow with length
    return RecurrentCache(self.zero_state(batch_size, dtype),
                          jnp.zeros((), jnp.int32))


def head_dense(d_model: int, num_heads: int, dim: int, rngs: nnx.Rngs,
               use_bias: bool = False) -> Dense:
  """d_model -> [num_heads, dim]."""
  return Dense(d_model, (num_heads, dim), in_axes=("embed",),
               out_axes=("heads", "head_dim"), rngs=rngs, use_bias=use_bias)


class LinearMixer(RecurrentMixer):
  """Per-head q, k [heads, key_dim], v [heads, head_dim] and the output
  projection, plus the `form` / `chunk_size` options of the shared kernel."""

  def __init__(self, d_model, *, rngs, num_heads, key_dim, head_dim, form,
               chunk_size):
    kernel.check_form(form, chunk_size, type(self).registered_name)
    self.num_heads, self.key_dim, self.head_dim = num_heads, key_dim, head_dim
    self.form, self.chunk_size = form, chunk_size
    self.q = head_dense(d_model, num_heads, key_dim, rngs)
    self.k = head_dense(d_model, num_heads, key_dim, rngs)
    self.v = head_dense(d_model, num_heads, head_dim, rngs)
    self.o = Dense((num_heads, head_dim), d_model, in_axes=("heads", "head_dim"),
                   out_axes=("embed",), rngs=rngs)

  def attend(self, q, k, v, segment_ids, state, log_decay=None):
    """The shared kernel in the configured form; returns (o, state)."""
    return kernel.causal_linear_attention(
        q, k, v, log_decay=log_decay, segment_ids=segment_ids, state=state,
        form=self.form, chunk_size=self.chunk_size)

  def zero_state(self, batch_size, dtype):
    return jnp.zeros((batch_size, self.num_heads, self.key_dim, self.head_dim),
                     jnp.float32)

  def projection_flops(self) -> float:
    return 2.0 * sum(m.kernel.size for m in (self.q, self.k, self.v, self.o))

  def kernel_flops(self, seq_len, key_dim, value_dim) -> float:
    """All heads of the shared kernel, in the configured form."""
    return self.num_heads * kernel.flops_per_token(
        self.form, seq_len, self.chunk_size, key_dim, value_dim)


class FeatureAttention(LinearMixer):
  """Normalized linear attention:

    o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / sum_{s<=t} phi(q_t).phi(k_s)

  phi(.) has `feature_dim` channels. The state [B, H, feature_dim,
  head_dim + 1] (fp32) holds sum phi(k) v^T and, in its last column, the
  running sum of phi(k).
  """

  feature_dim: int

  def zero_state(self, batch_size, dtype):
    return jnp.zeros((batch_size, self.num_heads, self.feature_dim,
                      self.head_dim + 1), jnp.float32)

  def attend(self, fq, fk, v, segment_ids, state, log_decay=None):
    """Normalized linear attention of features fq, fk [B, L, H, F]."""
    return kernel.normalized_linear_attention(
        fq, fk, v, log_decay=log_decay, segment_ids=segment_ids, state=state,
        form=self.form, chunk_size=self.chunk_size)

  def flops_per_token(self, seq_len):
    return self.projection_flops() + self.kernel_flops(
        seq_len, self.feature_dim, self.head_dim + 1)


@register("linear_attention")
class LinearAttention(FeatureAttention):
  """Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs:
  Fast Autoregressive Transformers with Linear Attention", arXiv:2006.16236).

  phi(x) = elu(x) + 1 replaces exp(q.k) in softmax attention:
  o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t), S_t = sum_{s<=t} phi(k_s) v_s^T,
  z_t = sum_{s<=t} phi(k_s): the output is normalized by the running sum
  of keys.

  Cost: training O(L C d) time with the chunked form (chunk C), O(L^2 d)
  with `form="parallel"`; decode O(1) per token with a constant fp32 state
  of num_heads * head_dim * (head_dim + 1) values.

  Options: num_heads, head_dim (default d_model // num_heads); form: the
  full-sequence form, "auto" or one of "chunked", "parallel", "recurrent"
  or a Pallas kernel (all agree; see `layers.kernels.linear_attention`);
  chunk_size of the chunked form.
  """

  info = MixerInfo(family="linear attention", paper="Katharopoulos et al. "
                   "2020, arXiv:2006.16236", train_cost="linear",
                   decode_state="constant", supports_segments=True)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_heads: int = 4,
               head_dim: int | None = None, form: str = "auto",
               chunk_size: int = 64):
    _, head_dim = resolve_heads(d_model, num_heads, None, head_dim)
    super().__init__(d_model, rngs=rngs, num_heads=num_heads, key_dim=head_dim,
                     head_dim=head_dim, form=form, chunk_size=chunk_size)
    self.feature_dim = head_dim

  def mix(self, x, pos, segment_ids, state):
    phi = lambda z: jax.nn.elu(z.astype(jnp.float32)) + 1.0
    o, state = self.attend(phi(self.q(x)), phi(self.k(x)), self.v(x),
                           segment_ids, state)
    return self.o(o), state


class GatedHeadNorm(nnx.Module):
  """swish(x W_g [+ b_g]) * GroupNorm_heads(o), the output gate of RetNet
  and GLA: each head's output is normalized on its own (statistics in
  fp32), since heads with different decays have very different scales."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
               rngs: nnx.Rngs, use_bias: bool, eps: float = 1e-5):
    self.eps = eps
    self.gate = head_dense(d_model, num_heads, head_dim, rngs, use_bias=use_bias)
    self.scale = param(rngs, constant_init(1.0), (num_heads, head_dim),
                       ("heads", "head_dim"))
    self.bias = param(rngs, constant_init(0.0), (num_heads, head_dim),
                      ("heads", "head_dim"))

  def __call__(self, x, o_BxLxHxD):
    o = o_BxLxHxD.astype(jnp.float32)
    o = o - o.mean(-1, keepdims=True)
    o = o * jax.lax.rsqrt((o * o).mean(-1, keepdims=True) + self.eps)
    o = (o * self.scale[...] + self.bias[...]).astype(x.dtype)
    return jax.nn.silu(self.gate(x)) * o

  def flops_per_token(self) -> float:
    return 2.0 * self.gate.kernel.size
