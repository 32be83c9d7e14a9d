"""RWKV's token shift, shared by its time mixers and its channel mix."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.positions import segment_starts


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
  starts = segment_starts(segment_ids)
  starts = starts.reshape(starts.shape + (1,) * (x_BxLxD.ndim - 2))
  return jnp.where(starts, 0, prev).astype(x_BxLxD.dtype)


def lerp(x, prev, mu):
  """From the previous token to the current one: x mu + prev (1 - mu)."""
  return prev + (x - prev) * mu.astype(x.dtype)


def shift_ramp(d: int, power: float, offset: float = 0.0) -> jax.Array:
  """mu_i = (i / d)^power + offset: the RWKV token-shift init, which
  spreads channels from 'mostly previous token' to 'mostly current'."""
  return (jnp.arange(d, dtype=jnp.float32) / d) ** power + offset
