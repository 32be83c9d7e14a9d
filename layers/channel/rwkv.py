"""RWKV channel mix, and the token shift that RWKV's mixers share."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.channel import ChannelMixer, _hidden, register
from layers.params import Dense, param
from layers.positions import segment_positions


@struct.dataclass
class ShiftState:
  """The last token seen, [B, d_model] (zeros before the first)."""
  last: jax.Array


def token_shift(x_BxLxD: jax.Array, last_BxD: jax.Array | None = None,
                segment_ids: jax.Array | None = None) -> jax.Array:
  """x_{t-1} for every t: `last` (or zeros) before the first token, and
  zeros at the first token of every segment of a packed row. x is
  [B, L, ...]; last is x's trailing shape."""
  first = (jnp.zeros_like(x_BxLxD[:, :1]) if last_BxD is None
           else last_BxD[:, None].astype(x_BxLxD.dtype))
  prev = jnp.concatenate([first, x_BxLxD[:, :-1]], axis=1)
  if segment_ids is None:
    return prev
  starts = segment_starts(x_BxLxD, segment_ids)
  starts = starts.reshape(starts.shape + (1,) * (x_BxLxD.ndim - 2))
  return jnp.where(starts, 0, prev).astype(x_BxLxD.dtype)


def segment_starts(x_BxLxD, segment_ids):
  """[B, L] bool, True at the first token of every segment (the row's
  first included); all False without segment_ids."""
  if segment_ids is None:
    return jnp.zeros(x_BxLxD.shape[:2], bool)
  return segment_positions(segment_ids) == 0


def mix(x, prev, mu):
  """lerp from the previous token to the current one: x mu + prev (1 - mu)."""
  return prev + (x - prev) * mu.astype(x.dtype)


def shift_ramp(d: int, power: float, offset: float = 0.0) -> jax.Array:
  """mu_i = (i / d)^power + offset: the RWKV token-shift init, which
  spreads channels from 'mostly previous token' to 'mostly current'."""
  return (jnp.arange(d, dtype=jnp.float32) / d) ** power + offset


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
    k = jnp.square(jax.nn.relu(self.key(mix(x, prev, self.mu_k[...]))))
    y = jax.nn.sigmoid(self.receptance(mix(x, prev, self.mu_r[...]))) * self.value(k)
    if cache is None:
      return y
    return y, ShiftState(x[:, -1].astype(cache.last.dtype))

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    return ShiftState(jnp.zeros((batch_size, self.mu_k.shape[0]), dtype))

  def flops_per_token(self) -> float:
    return 2.0 * sum(math.prod(m.kernel.shape)
                     for m in (self.key, self.receptance, self.value))
