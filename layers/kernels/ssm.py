"""Linear time-invariant state-space cores: discretization, convolution
kernels and the recurrent form.

A continuous SSM x'(t) = A x + B u, y = C x is discretized with step dt to
x_t = Abar x_{t-1} + Bbar u_t, y_t = C x_t, whose output is the causal
convolution of u with the kernel K_l = C Abar^l Bbar. Real systems are kept
as N/2 complex modes of conjugate pairs, so outputs are 2 Re(...).

Everything here runs in fp32 / complex64 whatever the activation dtype:
powers Abar^l and long recurrences drift in bf16. The array functions are
jitted (lengths static) so eager calls compile one program each, not one
per primitive; inside an outer jit they inline.

The recurrent forms scan with `layers.kernels.linear_recurrence` (the one
linear-scan op). An op with interchangeable pure-JAX forms:
  DPLR_KERNEL: the S4 kernel of A = diag(Lambda) - P P^* over N/2 modes
    and their conjugates (bilinear): "cauchy" (generating function at roots
    of unity, Woodbury identity and Cauchy sums, then an inverse FFT) and
    "dense" (materialized real Abar and its Krylov powers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from layers.kernels import Impl, Op
from layers.kernels.linear_recurrence import linear_scan

# -- discretization -----------------------------------------------------------


def _zoh(dt, A):
  """Zero-order hold: Abar = exp(dt A), Bbar = (exp(dt A) - 1) / A * B."""
  log_a = dt * A
  return log_a, jnp.expm1(log_a) / A


def _bilinear(dt, A):
  """Bilinear (Tustin): Abar = (1 + dt A/2) / (1 - dt A/2),
  Bbar = dt / (1 - dt A/2) * B."""
  den = 1.0 - 0.5 * dt * A
  return jnp.log((1.0 + 0.5 * dt * A) / den), dt / den


DISCRETIZATIONS = {"zoh": _zoh, "bilinear": _bilinear}


def check_discretization(name: str) -> str:
  if name not in DISCRETIZATIONS:
    raise ValueError(f"unknown discretization {name!r}; choose one of "
                     f"{list(DISCRETIZATIONS)}")
  return name


def discretize_diag(dt: jax.Array, A: jax.Array, method: str):
  """Diagonal A (complex, broadcastable with dt) -> (log Abar, Bbar / B).

  log Abar rather than Abar: kernels need Abar^l = exp(l log Abar)."""
  return DISCRETIZATIONS[check_discretization(method)](dt, A)


@jax.jit
def bilinear_dplr(dt: jax.Array, Lambda: jax.Array, P: jax.Array, B: jax.Array):
  """Bilinear discretization of A = diag(Lambda) - P P^* (any complex DPLR).

  dt [...]; Lambda, P, B [..., N] -> Abar [..., N, N], Bbar [..., N]:
    Abar = M^-1 (I + dt/2 A),  Bbar = M^-1 dt B,  M = I - dt/2 A.
  M = diag(d) + h P P^* (d = 1 - h Lambda, h = dt/2) is diagonal plus rank
  one, so Woodbury inverts it exactly in O(N^2) with no LAPACK call:
    M^-1 = diag(1/d) - h (P/d)(P^*/d) / (1 + h P^* (P/d)),
  and as I + h A = 2 I - M, Abar = 2 M^-1 - I needs no matrix product.
  (A batched LAPACK solve here deadlocked jaxlib 0.10.2's CPU runtime when
  two layers ran theirs concurrently on a two-thread pool:
  tests/test_ssm.py::test_two_s4_layers_train_step_does_not_deadlock.)"""
  h = (0.5 * dt)[..., None]                                      # [..., 1]
  d_inv = 1.0 / (1.0 - h * Lambda)                               # [..., N]
  col, row = P * d_inv, P.conj() * d_inv                       # D^-1 P, P^* D^-1
  scale = h / (1.0 + h * jnp.sum(row * P, axis=-1, keepdims=True))
  eye = jnp.eye(Lambda.shape[-1], dtype=Lambda.dtype)
  M_inv = eye * d_inv[..., None, :] - (scale * col)[..., :, None] * row[..., None, :]
  Bbar = (2.0 * h) * (d_inv * B - scale * col * jnp.sum(row * B, axis=-1,
                                                         keepdims=True))
  return 2.0 * M_inv - eye, Bbar


# -- diagonal kernels ---------------------------------------------------------


@functools.partial(jax.jit, static_argnames="length")
def vandermonde_kernel(log_a: jax.Array, w: jax.Array, length: int) -> jax.Array:
  """K[l, ...] = 2 Re(sum_n w[..., n] exp(l log_a[..., n])) for l < length.

  log_a, w: [*C, N] complex -> K [length, *C] fp32. Materializes the
  [*C, N, length] Vandermonde matrix: O(C N L) time and memory."""
  l = jnp.arange(length, dtype=jnp.float32)
  powers = jnp.exp(log_a[..., None] * l)                        # [*C, N, L]
  k = 2.0 * jnp.einsum("...n,...nl->l...", w, powers,
                       precision=jax.lax.Precision.HIGHEST).real
  return k.astype(jnp.float32)


def diag_recurrence(log_a, b, c, u, x0, kernel: str = "sequential"):
  """Per-channel diagonal SSM by its recurrence, in complex64:

      x_t = exp(log_a) x_{t-1} + b u_t,   y_t = 2 Re(sum_n c_n x_{t,n})

  log_a, b, c: [*C, N]; u: [B, L, *C]; x0: [B, *C, N] complex.
  Returns y [B, L, *C] fp32 and the last state [B, *C, N]."""
  bu = b * u.astype(jnp.float32)[..., None]                     # [B, L, *C, N]
  x, last = linear_scan(jnp.exp(log_a), bu, x0, kernel)
  y = 2.0 * jnp.sum(c * x, axis=-1).real
  return y, last


# -- DPLR (S4) kernels --------------------------------------------------------
#
# S4 keeps N/2 modes of a conjugate-symmetric N-state system: the full
# system is A = diag(Lambda_f) - P_f P_f^* with Lambda_f = [Lambda, conj
# Lambda], P_f = [P, conj P], B_f = [B, conj B], C_f = [C, conj C] (the
# eigenbasis of a real system, e.g. HiPPO-LegS). The rank-one term couples
# the two halves, so no N/2-mode system alone is S4's; every form below
# works on the coupled system, which is real in the (Re, Im) coordinates
# of the kept modes: with x = a + i c the N/2 kept modes of the state
# [x, conj x], the real state is s = (a_0, c_0, a_1, c_1, ...), the layout
# of `layers.ssm.SSMState`, and the output is C_f [x, conj x] = 2 Re(C x).


def with_conjugates(x: jax.Array) -> jax.Array:
  """[..., N/2] kept modes -> [..., N]: the modes, then their conjugates."""
  return jnp.concatenate([x, x.conj()], axis=-1)


def _interleave(re: jax.Array, im: jax.Array) -> jax.Array:
  """[..., n] pairs -> [..., 2n] as re_0, im_0, re_1, im_1, ..."""
  return jnp.stack([re, im], axis=-1).reshape(re.shape[:-1] + (-1,))


def real_output(C: jax.Array) -> jax.Array:
  """C [..., N/2] -> the real row C_r [..., N] with C_r s = 2 Re(C x)."""
  return _interleave(2.0 * C.real, -2.0 * C.imag)


def _complex_output(C_r: jax.Array) -> jax.Array:
  """The inverse of `real_output`."""
  return jax.lax.complex(C_r[..., 0::2], -C_r[..., 1::2]) / 2.0


@jax.jit
def bilinear_conj_dplr(dt: jax.Array, Lambda: jax.Array, P: jax.Array,
                       B: jax.Array):
  """S4's discretized state equation: the bilinear discretization of the
  coupled system over Lambda, P, B [..., N/2] and their conjugates, as the
  real Abar [..., N, N] and Bbar [..., N] of the state s (see above).

  With the complex Abar_f = [[A11, A12], [conj A12, conj A11]] acting on
  [x, conj x], x' = A11 x + A12 conj x, so for x = a + i c:
    a' = Re(A11 + A12) a - Im(A11 - A12) c,
    c' = Im(A11 + A12) a + Re(A11 - A12) c."""
  Abar, Bbar = bilinear_dplr(dt, *map(with_conjugates, (Lambda, P, B)))
  n = Lambda.shape[-1]
  S = Abar[..., :n, :n] + Abar[..., :n, n:]
  T = Abar[..., :n, :n] - Abar[..., :n, n:]
  blocks = jnp.stack([jnp.stack([S.real, -T.imag], axis=-1),
                      jnp.stack([S.imag, T.real], axis=-1)], axis=-2)
  blocks = jnp.swapaxes(blocks, -3, -2)                         # [.., n, 2, n, 2]
  Abar_r = blocks.reshape(blocks.shape[:-4] + (2 * n, 2 * n))
  return Abar_r, _interleave(Bbar[..., :n].real, Bbar[..., :n].imag)


def _matmul(a, b):
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def matrix_power(A: jax.Array, n: int) -> jax.Array:
  """A^n for a static n >= 1 by squaring: O(N^3 log n), matmuls only."""
  result = None
  while True:
    if n & 1:
      result = A if result is None else _matmul(result, A)
    n >>= 1
    if not n:
      return result
    A = _matmul(A, A)


def krylov(Abar: jax.Array, b: jax.Array, length: int) -> jax.Array:
  """[b, Abar b, ..., Abar^{length-1} b] by doubling: [..., N] -> [L, ..., N].

  log2(L) matrix squarings and block products: O(N^2 L + N^3 log L)."""
  out = b[None]
  power = Abar
  while out.shape[0] < length:
    more = jnp.einsum("...mn,l...n->l...m", power, out,
                      precision=jax.lax.Precision.HIGHEST)
    out = jnp.concatenate([out, more], axis=0)
    power = _matmul(power, power)
  return out[:length]


@functools.partial(jax.jit, static_argnames="length")
def _dplr_dense(Lambda, P, B, C, dt, length):
  Abar, Bbar = bilinear_conj_dplr(dt, Lambda, P, B)
  states = krylov(Abar, Bbar, length)                           # [L, H, N]
  return jnp.einsum("...n,l...n->l...", real_output(C), states,
                    precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames="length")
def _dplr_cauchy(Lambda, P, B, C, dt, length):
  # sum_{l<L} C Abar^l Bbar z^l = C (I - Abar^L) (I - Abar z)^-1 Bbar at
  # z^L = 1, and with the bilinear Abar, Bbar:
  #   (I - Abar z)^-1 Bbar = 2 [(2/dt)(1 - z) - (1 + z) A]^-1 B.
  # With A = Lambda - P P^* the bracket is diag(den) + (1+z) P P^*, whose
  # inverse the Woodbury identity gives from Cauchy sums over 1/den. (This
  # form has no pole at z = -1, unlike the textbook 2/(1+z) factorization.)
  # Every sum runs over the modes and their conjugates, as in the S4 code:
  # the rank-one correction needs the full P_f^* (..)^-1 P_f. The kernel is
  # real, so the L/2+1 non-negative frequencies and an inverse rFFT do.
  Abar, _ = bilinear_conj_dplr(dt, Lambda, P, B)
  C_r = real_output(C)
  C_tilde = _complex_output(C_r - jnp.einsum(
      "...m,...mn->...n", C_r, matrix_power(Abar, length),
      precision=jax.lax.Precision.HIGHEST))
  freqs = jnp.arange(length // 2 + 1)
  z = jnp.exp(-2j * jnp.pi * freqs / length).astype(jnp.complex64)
  zz = z.reshape((-1,) + (1,) * Lambda.ndim)                    # [F, 1.., 1]
  r = 1.0 / ((2.0 / dt[..., None]) * (1.0 - zz)
             - with_conjugates(Lambda) * (1.0 + zz))           # [F, H, N]

  def cauchy(v):
    return jnp.sum(with_conjugates(v) * r, axis=-1)              # [F, H]

  k00, k01 = cauchy(C_tilde * B), cauchy(C_tilde * P)
  k10, k11 = cauchy(P.conj() * B), cauchy(P.conj() * P)
  zs = zz[..., 0]
  g = 2.0 * (k00 - (1.0 + zs) * k01 * k10 / (1.0 + (1.0 + zs) * k11))
  return jnp.fft.irfft(g, n=length, axis=0)


@jax.jit
def dense_recurrence(Abar, Bbar, C, u, x0):
  """x_t = Abar x_{t-1} + Bbar u_t, y_t = C x_t, per channel, real fp32:
  Abar [H, N, N]; Bbar, C [H, N]; u [B, L, H]; x0 [B, H, N].
  Returns y [B, L, H] and the last state. O(N^2) per channel and step."""

  def step(x, u_t):
    x = jnp.einsum("hmn,bhn->bhm", Abar, x, precision=jax.lax.Precision.HIGHEST)
    x = x + Bbar * u_t[..., None]
    return x, jnp.sum(C * x, axis=-1)

  x, y = jax.lax.scan(step, x0, jnp.moveaxis(u.astype(jnp.float32), 1, 0))
  return jnp.moveaxis(y, 0, 1), x


DPLR_KERNEL = Op(
    "dplr_kernel",
    impls={"cauchy": Impl("cauchy", _dplr_cauchy),
           "dense": Impl("dense", _dplr_dense)},
    order={"default": ("cauchy", "dense")},
)


def dplr_kernel(Lambda, P, B, C, dt, length: int, kernel: str = "auto"):
  """Real kernel [length, H] of S4's bilinear-discretized SSM: the coupled
  system over Lambda, P, B, C [H, N/2] and their conjugates (see above),
  K_l = C_f Abar_f^l Bbar_f = 2 Re(C x_l); dt [H]."""
  return DPLR_KERNEL.choose(kernel).fn(Lambda, P, B, C, dt, length).astype(jnp.float32)
