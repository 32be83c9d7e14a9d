"""S4: structured state space with a diagonal plus low-rank state matrix."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.kernels.fftconv import CAUSAL_CONV, causal_conv, fft_conv_flops
from layers.kernels.ssm import (DPLR_KERNEL, bilinear_dplr, dense_recurrence,
                                dplr_kernel)
from layers.mixers import register
from layers.mixers._lti import LTIMixer
from layers.mixers.base import MixerInfo
from layers.params import param
from layers.ssm import (GatedOutput, SSMState, as_complex, check_kernel,
                        check_state_dim, complex_normal, complex_param,
                        hippo_legs_nplr, log_dt_param, normal_param)


class DPLRSSM(nnx.Module):
  """Per-channel SSM with A = diag(Lambda) - P P^*, bilinear
  discretization; HiPPO-LegS NPLR init (Lambda, P, B in the eigenbasis of
  LegS's normal part), C complex normal."""

  def __init__(self, channels: int, state_dim: int, *, rngs: nnx.Rngs,
               dt_min: float, dt_max: float, kernel: str, dplr_kernel: str):
    Lambda, P, B, _ = hippo_legs_nplr(check_state_dim(state_dim))
    self.kernel, self.dplr_kernel = kernel, dplr_kernel
    self.modes = (channels, state_dim // 2)
    axes = ("embed", "state")
    tile = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.complex64), self.modes)
    self.lambda_log_re = param(None, jnp.log(-tile(Lambda).real), self.modes, axes)
    self.lambda_im = param(None, tile(Lambda).imag, self.modes, axes)
    self.P = complex_param(tile(P), axes)
    self.B = complex_param(tile(B), axes)
    self.C = complex_param(complex_normal(rngs, self.modes), axes)
    self.log_dt = log_dt_param(rngs, (channels,), ("embed",), dt_min, dt_max)
    self.D = normal_param(rngs, (channels,), ("embed",))

  def matrices(self):
    """Lambda, P, B, C complex [H, N/2] and dt [H]."""
    Lambda = jax.lax.complex(-jnp.exp(self.lambda_log_re[...]), self.lambda_im[...])
    return (Lambda, as_complex(self.P), as_complex(self.B), as_complex(self.C),
            jnp.exp(self.log_dt[...]))

  def __call__(self, u: jax.Array) -> jax.Array:
    k = dplr_kernel(*self.matrices(), u.shape[1], self.dplr_kernel)
    return causal_conv(u, k, self.kernel) + self.D[...] * u.astype(jnp.float32)

  def step(self, u: jax.Array, state: SSMState):
    Lambda, P, B, C, dt = self.matrices()
    Abar, Bbar = bilinear_dplr(dt, Lambda, P, B)
    y, x = dense_recurrence(Abar, Bbar, C, u, state.complex())
    return y + self.D[...] * u.astype(jnp.float32), SSMState.of(x)

  def init_state(self, batch_shape) -> SSMState:
    return SSMState.zeros(tuple(batch_shape) + self.modes)

  def flops_per_token(self, seq_len: int) -> float:
    """The "cauchy" kernel per token (four Cauchy sums over N/2 modes at L
    frequencies, an inverse FFT), the FFT convolution and skip. The dense
    discretization and Abar^L (O(d N^3 log L) per step, whatever the batch)
    shrink per token as L grows and are left out."""
    H, N = self.modes
    return H * (4 * 8 * N + 5 * math.log2(max(seq_len, 2))
                + fft_conv_flops(seq_len) + 2.0)


@register("s4")
class S4(LTIMixer):
  """S4 (Gu, Goel & Re, 2021, "Efficiently Modeling Long Sequences with
  Structured State Spaces", arXiv:2111.00396).

  Per channel, an N-state SSM (kept as N/2 complex modes, output 2 Re(.))
  with the DPLR state matrix A = diag(Lambda) - P P^* (rank 1; P = Q as in
  the later S4 code: with Re(Lambda) < 0, A + A^* is negative definite, so
  A stays stable), bilinear discretization
  Abar = (I - dt/2 A)^-1 (I + dt/2 A), Bbar = (I - dt/2 A)^-1 dt B, and
  y = K * u + D u with K_l = 2 Re(C Abar^l Bbar); output GLU(W GELU(y)).
  HiPPO-LegS init; the half system with its own rank-1 term, as in the
  S4 code.

  Kernel ("cauchy", the paper's algorithm): the truncated generating
  function at the L roots of unity, sum_l K_l z^l = C~ (I - Abar z)^-1 Bbar
  with C~ = C (I - Abar^L), evaluated with the Woodbury identity as four
  Cauchy sums over the N/2 modes (O(d N L)) and an inverse FFT. C~ needs
  Abar^L: computed densely (O(d N^3 log L)), so C stays the recurrence's
  C and the layer is one system for every length (the paper learns C~
  directly for a fixed L). "dense": Krylov powers of the materialized
  Abar (O(d N^2 L)), all matmuls. `dplr_kernel="auto"` takes "cauchy".
  Abar and Bbar come from a Woodbury inverse of the rank-one-corrected
  diagonal (I - dt/2 A), O(d N^2), no LAPACK. Precision: the Woodbury correction
  cancels terms ~|P|^2 ~ N^2/2 times the kernel, so in fp32 the "cauchy"
  kernel matches the recurrence to ~3e-6 relative at the default dt range
  and ~4e-5 at dt up to 0.5 (N = 64), "dense" to ~1e-6 and ~4e-6. The
  convolution is FFT, O(d L log L).
  Decode: the recurrence with the materialized Abar, O(d N^2) per token, a
  constant fp32 state of d * N/2 complex values. Everything SSM-side is
  fp32/complex64 for any input dtype.

  Options: state_dim N (even); dt_min, dt_max; kernel ("auto" or a
  CAUSAL_CONV impl); dplr_kernel ("auto" or a
  `layers.kernels.ssm.DPLR_KERNEL` impl).
  """

  info = MixerInfo(family="ssm", paper="Gu et al. 2021, arXiv:2111.00396",
                   train_cost="n log n", decode_state="constant",
                   supports_segments=False)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, state_dim: int = 64,
               dt_min: float = 1e-3, dt_max: float = 1e-1, kernel: str = "auto",
               dplr_kernel: str = "auto"):
    self.core = DPLRSSM(d_model, state_dim, rngs=rngs, dt_min=dt_min,
                        dt_max=dt_max, kernel=check_kernel(CAUSAL_CONV, kernel),
                        dplr_kernel=check_kernel(DPLR_KERNEL, dplr_kernel))
    self.out = GatedOutput(d_model, "glu", rngs=rngs)
