"""Linear time-invariant state-space cores: discretization, convolution
kernels and linear scans.

A continuous SSM x'(t) = A x + B u, y = C x is discretized with step dt to
x_t = Abar x_{t-1} + Bbar u_t, y_t = C x_t, whose output is the causal
convolution of u with the kernel K_l = C Abar^l Bbar. Real systems are kept
as N/2 complex modes of conjugate pairs, so outputs are 2 Re(...).

Everything here runs in fp32 / complex64 whatever the activation dtype:
powers Abar^l and long recurrences drift in bf16. The array functions are
jitted (lengths static) so eager calls compile one program each, not one
per primitive; inside an outer jit they inline.

Ops with interchangeable pure-JAX forms (a Pallas kernel slots in as another
impl):
  DIAG_SCAN: h_t = a_t * h_{t-1} + b_t, elementwise: "associative"
    (jax.lax.associative_scan, O(L) work, O(log L) depth) and "sequential"
    (jax.lax.scan, O(L) steps).
  DPLR_KERNEL: the S4 kernel of A = diag(Lambda) - P P^* (bilinear):
    "cauchy" (generating function at roots of unity, Woodbury identity and
    Cauchy sums, then an inverse FFT) and "dense" (materialized Abar and its
    Krylov powers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from layers.kernels import Impl, Op

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
  """Bilinear discretization of A = diag(Lambda) - P P^* (S4's DPLR form).

  dt [...]; Lambda, P, B [..., N] -> Abar [..., N, N], Bbar [..., N]:
    Abar = M^-1 (I + dt/2 A),  Bbar = M^-1 dt B,  M = I - dt/2 A.
  M = diag(d) + h P P^* (d = 1 - h Lambda, h = dt/2) is diagonal plus rank
  one, so Woodbury inverts it exactly in O(N^2) with no LAPACK call:
    M^-1 = diag(1/d) - h (P/d)(P^*/d) / (1 + h P^* (P/d)).
  (A batched LAPACK solve here deadlocked jaxlib 0.10.2's CPU runtime when
  two layers ran theirs concurrently on a two-thread pool:
  tests/test_ssm.py::test_two_s4_layers_train_step_does_not_deadlock.)"""
  h = (0.5 * dt)[..., None]                                      # [..., 1]
  d_inv = 1.0 / (1.0 - h * Lambda)                               # [..., N]
  col, row = P * d_inv, P.conj() * d_inv                       # D^-1 P, P^* D^-1
  scale = h / (1.0 + h * jnp.sum(row * P, axis=-1, keepdims=True))
  eye = jnp.eye(Lambda.shape[-1], dtype=Lambda.dtype)
  M_inv = eye * d_inv[..., None, :] - (scale * col)[..., :, None] * row[..., None, :]
  right = eye + h[..., None] * dplr_matrix(Lambda, P)           # I + h A
  Abar = jnp.matmul(M_inv, right, precision=jax.lax.Precision.HIGHEST)
  Bbar = jnp.einsum("...mn,...n->...m", M_inv, (2.0 * h) * B,
                    precision=jax.lax.Precision.HIGHEST)
  return Abar, Bbar


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
  x = DIAG_SCAN.choose(kernel).fn(jnp.exp(log_a), bu, x0)
  y = 2.0 * jnp.sum(c * x, axis=-1).real
  return y, x[:, -1]


# -- linear scans -------------------------------------------------------------


@jax.jit
def _sequential(a, b, h0):
  a = jnp.broadcast_to(a, b.shape)

  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h

  _, h = jax.lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
  return jnp.moveaxis(h, 0, 1)


def _combine(left, right):
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


@jax.jit
def _associative(a, b, h0):
  a = jnp.broadcast_to(a, b.shape)
  # Fold the initial state into the first input: h_0 = a_0 h0 + b_0.
  b = b.at[:, 0].add(a[:, 0] * h0)
  return jax.lax.associative_scan(_combine, (a, b), axis=1)[1]


DIAG_SCAN = Op(
    "diag_scan",
    impls={"associative": Impl("associative", _associative),
           "sequential": Impl("sequential", _sequential)},
    order={"default": ("associative", "sequential")},
)


def diag_scan(a: jax.Array, b: jax.Array, h0: jax.Array,
              kernel: str = "auto") -> jax.Array:
  """All states of h_t = a_t h_{t-1} + b_t along axis 1.

  b: [B, L, *S]; a: broadcastable to b; h0: [B, *S]. Returns [B, L, *S]."""
  return DIAG_SCAN.choose(kernel).fn(a, b, h0)


# -- DPLR (S4) kernels --------------------------------------------------------


def dplr_matrix(Lambda: jax.Array, P: jax.Array) -> jax.Array:
  """A = diag(Lambda) - P P^*: [..., N] -> [..., N, N]."""
  return (jnp.eye(Lambda.shape[-1], dtype=Lambda.dtype) * Lambda[..., None]
          - P[..., :, None] * P[..., None, :].conj())


def krylov(Abar: jax.Array, b: jax.Array, length: int) -> jax.Array:
  """[b, Abar b, ..., Abar^{length-1} b] by doubling: [..., N] -> [L, ..., N].

  log2(L) matrix squarings and block products: O(N^2 L + N^3 log L)."""
  out = b[None]
  power = Abar
  while out.shape[0] < length:
    more = jnp.einsum("...mn,l...n->l...m", power, out,
                      precision=jax.lax.Precision.HIGHEST)
    out = jnp.concatenate([out, more], axis=0)
    power = jnp.matmul(power, power, precision=jax.lax.Precision.HIGHEST)
  return out[:length]


@functools.partial(jax.jit, static_argnames="length")
def _dplr_dense(Lambda, P, B, C, dt, length):
  Abar, Bbar = bilinear_dplr(dt, Lambda, P, B)
  states = krylov(Abar, Bbar, length)                           # [L, H, N]
  return 2.0 * jnp.einsum("...n,l...n->l...", C, states,
                          precision=jax.lax.Precision.HIGHEST).real


@functools.partial(jax.jit, static_argnames="length")
def _dplr_cauchy(Lambda, P, B, C, dt, length):
  # sum_{l<L} C Abar^l Bbar z^l = C (I - Abar^L) (I - Abar z)^-1 Bbar at
  # z^L = 1, and with the bilinear Abar, Bbar:
  #   (I - Abar z)^-1 Bbar = 2 [(2/dt)(1 - z) - (1 + z) A]^-1 B.
  # With A = Lambda - P P^* the bracket is diag(den) + (1+z) P P^*, whose
  # inverse the Woodbury identity gives from Cauchy sums over 1/den. (This
  # form has no pole at z = -1, unlike the textbook 2/(1+z) factorization.)
  Abar, _ = bilinear_dplr(dt, Lambda, P, B)
  AbarL = jnp.linalg.matrix_power(Abar, length)
  C_tilde = C - jnp.einsum("...m,...mn->...n", C, AbarL,
                           precision=jax.lax.Precision.HIGHEST)
  z = jnp.exp(-2j * jnp.pi * jnp.arange(length) / length).astype(jnp.complex64)
  zz = z.reshape((length,) + (1,) * Lambda.ndim)                # [L, 1.., 1]
  r = 1.0 / ((2.0 / dt[..., None]) * (1.0 - zz) - Lambda * (1.0 + zz))  # [L, H, N]

  def cauchy(left, right):
    return jnp.sum(left * right * r, axis=-1)                    # [L, H]

  Pc = P.conj()
  k00, k01 = cauchy(C_tilde, B), cauchy(C_tilde, P)
  k10, k11 = cauchy(Pc, B), cauchy(Pc, P)
  g = 2.0 * (k00 - (1.0 + zz[..., 0]) * k01 * k10 / (1.0 + (1.0 + zz[..., 0]) * k11))
  return 2.0 * jnp.fft.ifft(g, axis=0).real


@jax.jit
def dense_recurrence(Abar, Bbar, C, u, x0):
  """x_t = Abar x_{t-1} + Bbar u_t, y_t = 2 Re(C x_t), per channel, in
  complex64: Abar [H, N, N]; Bbar, C [H, N]; u [B, L, H]; x0 [B, H, N].
  Returns y [B, L, H] fp32 and the last state. O(N^2) per channel and step."""

  def step(x, u_t):
    x = jnp.einsum("hmn,bhn->bhm", Abar, x, precision=jax.lax.Precision.HIGHEST)
    x = x + Bbar * u_t[..., None]
    return x, 2.0 * jnp.sum(C * x, axis=-1).real

  x, y = jax.lax.scan(step, x0, jnp.moveaxis(u.astype(jnp.float32), 1, 0))
  return jnp.moveaxis(y, 0, 1), x


DPLR_KERNEL = Op(
    "dplr_kernel",
    impls={"cauchy": Impl("cauchy", _dplr_cauchy),
           "dense": Impl("dense", _dplr_dense)},
    order={"default": ("cauchy", "dense")},
)


def dplr_kernel(Lambda, P, B, C, dt, length: int, kernel: str = "auto"):
  """Real kernel [length, H] of the bilinear-discretized SSM with
  A = diag(Lambda) - P P^*, from complex Lambda, P, B, C [H, N] and dt [H]."""
  return DPLR_KERNEL.choose(kernel).fn(Lambda, P, B, C, dt, length).astype(jnp.float32)
