"""Causal long convolution along the time axis.

    y[b, t, ...] = sum_{s <= t} k[t - s, ...] * u[b, s, ...]

u is [B, L, *C]; k is [L', *C'] with L' >= L and C' broadcastable to C
by numpy rules (trailing dims align: a per-head kernel [L, H] against
u [B, L, d, d, H], say). Both
forms compute in fp32 whatever the input dtype: a bf16 FFT loses the
small late taps of a decaying kernel.

Impls:
  "fft": O(L log L) per channel. Zero-pads both signals to 2L before the
    FFT: a circular convolution of length >= 2L - 1 equals the linear one,
    so nothing wraps from the end of the sequence back to its start
    (without the padding the output at t would see inputs after t).
  "direct": O(L^2) per channel, a Toeplitz matrix product; exact up to
    fp32 summation and the reference the FFT is tested against.
Both are jitted, so an eager call compiles one program.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from layers.kernels import Impl, Op


@jax.jit
def _fft(u: jax.Array, k: jax.Array) -> jax.Array:
  L = u.shape[1]
  n = 2 * L
  u_f = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)       # [B, L+1, *C]
  k_f = jnp.fft.rfft(k[:L].astype(jnp.float32), n=n, axis=0)   # [L+1, *C']
  return jnp.fft.irfft(u_f * k_f, n=n, axis=1)[:, :L]


@jax.jit
def conv_rows(u: jax.Array, k: jax.Array, rows: jax.Array) -> jax.Array:
  """Outputs at time indices `rows` [R] of the causal convolution of
  u [B, S, *C] with k [>=S, *C']: y[:, r] = sum_{s <= rows[r]} k[rows[r]-s] u[:, s].

  O(R * S) per channel. Used by `direct` (rows = all) and by decoders that
  keep the whole input history (rows = the new positions)."""
  S = u.shape[1]
  lag = rows[:, None] - jnp.arange(S)[None, :]                  # [R, S]
  taps = jnp.take(k.astype(jnp.float32), jnp.clip(lag, 0, k.shape[0] - 1), axis=0)
  causal = (lag >= 0).reshape(lag.shape + (1,) * (k.ndim - 1))
  toeplitz = jnp.where(causal, taps, 0.0)                       # [R, S, *C']
  return jnp.einsum("rs...,bs...->br...", toeplitz, u.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def _direct(u: jax.Array, k: jax.Array) -> jax.Array:
  return conv_rows(u, k, jnp.arange(u.shape[1]))


CAUSAL_CONV = Op(
    "causal_conv",
    impls={"fft": Impl("fft", _fft), "direct": Impl("direct", _direct)},
    order={"default": ("fft", "direct")},
)


def causal_conv(u: jax.Array, k: jax.Array, kernel: str = "auto") -> jax.Array:
  """fp32 causal convolution of u [B, L, *C] with k [>=L, *C'] (module doc)."""
  if k.shape[0] < u.shape[1]:
    raise ValueError(f"convolution kernel of length {k.shape[0]} is shorter "
                     f"than the sequence ({u.shape[1]})")
  k = k.reshape(k.shape[:1] + (1,) * (u.ndim - 1 - k.ndim) + k.shape[1:])
  return CAUSAL_CONV.choose(kernel).fn(u, k)


def fft_conv_flops(seq_len: int) -> float:
  """FLOPs per token per channel of the "fft" form: three real FFTs of size
  2L (~2.5 n log2 n each: input, kernel, inverse) and a complex product per
  frequency, amortized over the L tokens."""
  n = 2 * seq_len
  return (3 * 2.5 * n * math.log2(n) + 6 * (seq_len + 1)) / seq_len
