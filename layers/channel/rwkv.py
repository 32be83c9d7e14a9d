"""RWKV channel mix."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.blocks.shift import lerp, shift_ramp, token_shift
from layers.channel import ChannelMixer, _hidden, register
from layers.params import Dense, param


@struct.dataclass
class ShiftState:
  """The last token seen, [B, d_model] (zeros before the first)."""
  last: jax.Array


@register("rwkv4_channel")
class RWKVChannel(ChannelMixer):
  """RWKV channel mix (Peng et al., 2023, "RWKV: Reinventing RNNs for the
  Transformer Era", arXiv:2305.13048; unchanged in RWKV-5/6):

    k = relu(W_k lerp(x_{t-1}, x_t, mu_k))^2,   r = sigmoid(W_r lerp(x_{t-1}, x_t, mu_r))
    y = r * (W_v k)

  A token shift makes it stateful: the cache keeps the last token. Packed
  rows (segment_ids) shift in zeros at each segment start. Default hidden
  = 4 d_model.
  """

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, hidden: int | None = None,
               mult: float = 4.0):
    h = _hidden(d_model, hidden, mult)
    self.mu_k = param(rngs, shift_ramp(d_model, 0.5), (d_model,), ("embed",))
    self.mu_r = param(rngs, shift_ramp(d_model, 0.5), (d_model,), ("embed",))
    self.key = Dense(d_model, h, in_axes=("embed",), out_axes=("mlp",), rngs=rngs)
    self.receptance = Dense(d_model, d_model, in_axes=("embed",),
                            out_axes=("embed",), rngs=rngs)
    self.value = Dense(h, d_model, in_axes=("mlp",), out_axes=("embed",), rngs=rngs)

  def __call__(self, x, *, cache: ShiftState | None = None, segment_ids=None):
    if cache is not None and segment_ids is not None:
      raise ValueError("rwkv4_channel: segment_ids are for full-sequence "
                       "calls, not with a cache")
    prev = token_shift(x, None if cache is None else cache.last, segment_ids)
    k = jnp.square(jax.nn.relu(self.key(lerp(x, prev, self.mu_k[...]))))
    y = jax.nn.sigmoid(self.receptance(lerp(x, prev, self.mu_r[...]))) * self.value(k)
    if cache is None:
      return y
    return y, ShiftState(x[:, -1].astype(cache.last.dtype))

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    return ShiftState(jnp.zeros((batch_size, self.mu_k.shape[0]), dtype))

  def flops_per_token(self) -> float:
    return 2.0 * sum(math.prod(m.kernel.shape)
                     for m in (self.key, self.receptance, self.value))
