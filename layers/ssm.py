"""Building blocks shared by the state-space and long-convolution mixers
(S4, S4D, DSS, S5, H3, Hyena): complex parameters, HiPPO / S4D
initializations, diagonal SSMs (S4D, and the base DSS builds on), a causal
short convolution with a decode state, gated output mixing and the fp32
state cache.

The numerical cores (kernels, scans, FFT convolution) live in
`layers.kernels.ssm` and `layers.kernels.fftconv`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from layers.kernels import Op
from layers.kernels.conv1d import causal_conv1d
from layers.kernels.fftconv import causal_conv, fft_conv_flops
from layers.kernels.ssm import (check_discretization, diag_recurrence,
                                discretize_diag, vandermonde_kernel)
from layers.params import Dense, fan_in_init, param

# -- parameters ---------------------------------------------------------------


def complex_param(value: np.ndarray | jax.Array, axes, *,
                  weight_decay: bool = True) -> nnx.Param:
  """A complex parameter stored as fp32 (re, im) pairs in a trailing axis,
  so optimizers, checkpoints and sharding see only real arrays."""
  value = jnp.asarray(value, jnp.complex64)
  pair = jnp.stack([value.real, value.imag], axis=-1)
  return param(None, pair, pair.shape, tuple(axes) + (None,),
               weight_decay=weight_decay)


def as_complex(p: nnx.Param) -> jax.Array:
  v = p[...]
  return jax.lax.complex(v[..., 0], v[..., 1])


def complex_normal(rngs: nnx.Rngs, shape, std: float = 1.0) -> jax.Array:
  """Circular complex normal with E|z|^2 = std^2."""
  z = jax.random.normal(rngs.params(), tuple(shape) + (2,)) * (std / math.sqrt(2))
  return jax.lax.complex(z[..., 0], z[..., 1])


def log_dt_param(rngs: nnx.Rngs, shape, axes, dt_min: float, dt_max: float):
  """log dt, uniform in [log dt_min, log dt_max] (the S4 family's init);
  never weight-decayed."""
  if not 0 < dt_min <= dt_max:
    raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, "
                     f"dt_max={dt_max}")
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
  return param(rngs, init, shape, axes, weight_decay=False)


def normal_param(rngs: nnx.Rngs, shape, axes) -> nnx.Param:
  """Standard normal (the S4 family's skip D and Hyena's filter bias)."""
  return param(rngs, lambda k, s, d: jax.random.normal(k, s, d), shape, axes)


def check_kernel(op: Op, requested: str) -> str:
  return op.check(requested)


def check_state_dim(state_dim: int) -> int:
  if state_dim < 2 or state_dim % 2:
    raise ValueError(f"state_dim must be an even number >= 2 (N/2 complex "
                     f"modes of conjugate pairs), got {state_dim}")
  return state_dim


# -- initializations ----------------------------------------------------------


def hippo_legs_nplr(state_dim: int, b_clip: float | None = None):
  """HiPPO-LegS as normal plus low rank, A = S - p p^T, diagonalized.

  A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k);
  p_n = sqrt(n + 1/2); b_n = sqrt(2n+1). S = A + p p^T is -1/2 I plus a
  skew-symmetric matrix, so S = V diag(Lambda) V^* with unitary V and
  Re(Lambda) = -1/2. Returns the N/2 modes with Im(Lambda) > 0 (the others
  are their conjugates, with eigenvectors conj(V)): Lambda, V^* p, V^* b
  [N/2] and V [N, N/2], as numpy complex128. The real system is recovered
  only with both halves: A = V_f (diag(Lambda_f) - P_f P_f^*) V_f^* with
  V_f = [V, conj V], Lambda_f = [Lambda, conj Lambda], P_f = [V^* p,
  conj(V^* p)]. Gu et al. 2021 (S4), sec. 3.3.

  b_clip: clip Im(V^* b) to [-b_clip, b_clip], as the S4 code's `nplr`
  does (B_clip=2.0 there); None keeps b exact. The clipped b is no longer
  LegS's, and which entries it changes depends on the eigenvectors' phases
  (LAPACK's eigh convention, shared by numpy and torch here)."""
  if b_clip is not None and not b_clip > 0:
    raise ValueError(f"b_clip must be None or > 0, got {b_clip}")
  n = np.arange(state_dim)
  r = np.sqrt(2 * n + 1.0)
  A = -np.tril(r[:, None] * r[None, :], -1) - np.diag(n + 1.0)
  p = np.sqrt(n + 0.5)
  skew = A + np.outer(p, p) + 0.5 * np.eye(state_dim)
  omega, V = np.linalg.eigh(-1j * skew)           # skew = V (i omega) V^*
  keep = np.argsort(omega)[state_dim // 2:]       # omega > 0
  V = V[:, keep]
  Lambda = -0.5 + 1j * omega[keep]
  b = V.conj().T @ r
  if b_clip is not None:
    b = b.real + 1j * np.clip(b.imag, -b_clip, b_clip)
  return Lambda, V.conj().T @ p, b, V


def s4d_eigenvalues(init: str, state_dim: int) -> np.ndarray:
  """S4D diagonal A [N/2] (Gu et al. 2022, sec. 4):
  "lin": -1/2 + i pi n;  "inv": -1/2 + i N/pi (N/(2n+1) - 1)."""
  n = np.arange(state_dim // 2)
  imag = {"lin": lambda: np.pi * n,
          "inv": lambda: state_dim / np.pi * (state_dim / (2 * n + 1) - 1)}
  if init not in imag:
    raise ValueError(f"unknown S4D init {init!r}; choose one of {list(imag)}")
  return -0.5 + 1j * imag[init]()


# -- diagonal SSMs ------------------------------------------------------------


@struct.dataclass
class SSMState:
  """fp32 (re, im) pairs of a complex recurrent state, whatever the
  activation dtype: a bf16 state drifts over long decodes."""
  x: jax.Array

  @classmethod
  def zeros(cls, shape) -> "SSMState":
    return cls(jnp.zeros(tuple(shape) + (2,), jnp.float32))

  def complex(self) -> jax.Array:
    return jax.lax.complex(self.x[..., 0], self.x[..., 1])

  @classmethod
  def of(cls, x: jax.Array) -> "SSMState":
    return cls(jnp.stack([x.real, x.imag], axis=-1))


class DiagonalLTI(nnx.Module):
  """A per-channel diagonal LTI system with skip D, on the trailing axis of
  [B, L, ..., H] inputs:

      x_t = Abar x_{t-1} + Bbar u_t,   y_t = 2 Re(C x_t) + D u_t

  Full form: Vandermonde kernel K_l = 2 Re(C Abar^l Bbar) and a causal
  convolution (`kernel` picks its impl); incremental form: the recurrence.
  Both in fp32/complex64. Subclasses define the parameters, `system()`,
  `D` [H], `modes` (H, N/2) and `kernel`.
  """

  def system(self):
    """(log Abar, Bbar, C), complex [H, N/2]."""
    raise NotImplementedError

  def __call__(self, u: jax.Array) -> jax.Array:
    """Full form, fp32 [B, L, ..., H]."""
    log_a, b, c = self.system()
    k = vandermonde_kernel(log_a, b * c, u.shape[1])
    return causal_conv(u, k, self.kernel) + self.D[...] * u.astype(jnp.float32)

  def step(self, u: jax.Array, state: "SSMState"):
    """Incremental form (the recurrence) from `state`."""
    log_a, b, c = self.system()
    y, x = diag_recurrence(log_a, b, c, u, state.complex())
    return y + self.D[...] * u.astype(jnp.float32), SSMState.of(x)

  def init_state(self, batch_shape) -> "SSMState":
    return SSMState.zeros(tuple(batch_shape) + self.modes)

  def flops_per_token(self, seq_len: int, copies: int = 1) -> float:
    """Kernel generation (per mode and position a complex exp, product and
    sum, ~16 real FLOPs) plus `copies` input channels per SSM channel
    through the FFT convolution and the skip."""
    H, modes = self.modes
    return H * (16.0 * modes + copies * (fft_conv_flops(seq_len) + 2.0))


class S4DSSM(DiagonalLTI):
  """S4D (Gu et al. 2022): A = -exp(a_log) + i a_imag (real part kept
  negative), S4D-Lin/Inv init, B = 1 (absorbed into C, as in the S4D code),
  C complex normal, dt per channel, ZOH or bilinear discretization.
  `axis` names the channel axis of the parameters ("embed", "heads")."""

  def __init__(self, channels: int, state_dim: int, *, rngs: nnx.Rngs,
               init: str = "lin", discretization: str = "zoh",
               dt_min: float = 1e-3, dt_max: float = 1e-1,
               kernel: str = "auto", axis: str = "embed"):
    A = s4d_eigenvalues(init, check_state_dim(state_dim))
    self.discretization = check_discretization(discretization)
    self.kernel = kernel
    self.modes = (channels, state_dim // 2)
    self.log_dt = log_dt_param(rngs, (channels,), (axis,), dt_min, dt_max)
    self.a_log = param(None, jnp.broadcast_to(jnp.log(-A.real), self.modes),
                       self.modes, (axis, "state"), weight_decay=False)
    self.a_imag = param(None, jnp.broadcast_to(A.imag, self.modes),
                        self.modes, (axis, "state"), weight_decay=False)
    self.C = complex_param(complex_normal(rngs, self.modes), (axis, "state"))
    self.D = normal_param(rngs, (channels,), (axis,))

  def system(self):
    A = jax.lax.complex(-jnp.exp(self.a_log[...]), self.a_imag[...])
    dt = jnp.exp(self.log_dt[...])[:, None]
    log_a, b = discretize_diag(dt, A, self.discretization)
    return log_a, b, as_complex(self.C)


# -- short causal convolution -------------------------------------------------


# Jitted so an eager call compiles one program rather than a slice per tap.
_conv1d = jax.jit(causal_conv1d)


class ShortConv(nnx.Module):
  """Depthwise causal convolution over a multi-axis channel shape:
  y_t = sum_{k<width} w_k x_{t-width+1+k} (+ bias), w_{width-1} on the
  current input (the `layers.kernels.conv1d` convention), with the last
  width-1 inputs as decode state. Accumulates in fp32, returns x's dtype."""

  def __init__(self, channels: tuple[int, ...], width: int, *, rngs: nnx.Rngs,
               axes: tuple[str | None, ...], use_bias: bool = True):
    if width < 1:
      raise ValueError(f"convolution width must be >= 1, got {width}")
    channels = tuple(channels)
    self.width = width
    self.taps = param(rngs, fan_in_init(width), (width,) + channels,
                      ("conv",) + tuple(axes))
    self.bias = (param(rngs, fan_in_init(width), channels, axes)
                 if use_bias else None)

  def __call__(self, x: jax.Array, state: jax.Array | None = None,
               segment_ids: jax.Array | None = None):
    """x [B, L, *channels]; state [B, width-1, *channels] (zeros when
    None); segment_ids [B, L] for packed rows (taps stop at a segment
    start; not with state). Returns y like x and the new state."""
    flat = lambda a: a.reshape(a.shape[:2] + (-1,))
    bias = None if self.bias is None else self.bias[...].reshape(-1)
    y, state = _conv1d(flat(x), self.taps[...].reshape(self.width, -1), bias,
                       None if state is None else flat(state),
                       segment_ids=segment_ids)
    return y.reshape(x.shape), state.reshape(state.shape[:2] + x.shape[2:])

  def flops_per_token(self) -> float:
    return 2.0 * self.taps.size


# -- output mixing ------------------------------------------------------------


class GatedOutput(nnx.Module):
  """Position-wise output of the S4 family, after the SSM:
    "glu": GLU(W GELU(y)) with W: d -> 2d (S4 / S4D / DSS code);
    "half_glu": g * sigmoid(W g), g = GELU(y), W: d -> d (S5 code)."""

  def __init__(self, d_model: int, gate: str, *, rngs: nnx.Rngs):
    widths = {"glu": 2, "half_glu": 1}
    if gate not in widths:
      raise ValueError(f"unknown output gate {gate!r}; choose one of {list(widths)}")
    self.gate = gate
    self.proj = Dense(d_model, (widths[gate], d_model), in_axes=("embed",),
                      out_axes=(None, "embed"), rngs=rngs, use_bias=True)

  def __call__(self, y: jax.Array) -> jax.Array:
    g = jax.nn.gelu(y)
    z = self.proj(g)
    if self.gate == "glu":
      return z[..., 0, :] * jax.nn.sigmoid(z[..., 1, :])
    return g * jax.nn.sigmoid(z[..., 0, :])

  def flops_per_token(self) -> float:
    return 2.0 * self.proj.kernel.size
