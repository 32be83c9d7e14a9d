"""S4: structured state space with a diagonal plus low-rank state matrix."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.blocks.lti import LTIMixer
from layers.blocks.ssm import (GatedOutput, SSMState, as_complex,
                               check_state_dim, complex_normal, complex_param,
                               hippo_legs_nplr, log_dt_param, normal_param)
from layers.kernels.fftconv import CAUSAL_CONV, causal_conv, fft_conv_flops
from layers.kernels.ssm import (DPLR_KERNEL, bilinear_conj_dplr,
                                dense_recurrence, dplr_kernel, real_output)
from layers.mixers import register
from layers.mixers.base import MixerInfo
from layers.params import param


class DPLRSSM(nnx.Module):
  """Per-channel N-state SSM kept as N/2 complex modes, A = diag(Lambda_f)
  - P_f P_f^* over the modes and their conjugates (see
  `layers.kernels.ssm`), bilinear discretization; HiPPO-LegS NPLR init
  (Lambda, P, B in the eigenbasis of LegS's normal part, Im B clipped to
  +-b_clip unless None), C complex normal. The decode state is the real
  state of the coupled system: the (re, im) pairs of the N/2 modes."""

  def __init__(self, channels: int, state_dim: int, *, rngs: nnx.Rngs,
               dt_min: float, dt_max: float, b_clip: float | None,
               kernel: str, dplr_kernel: str):
    Lambda, P, B, _ = hippo_legs_nplr(check_state_dim(state_dim), b_clip)
    self.kernel, self.dplr_kernel = kernel, dplr_kernel
    self.modes = (channels, state_dim // 2)
    axes = ("embed", "state")
    tile = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.complex64), self.modes)
    # A (Lambda, P) and B are the SSM's dynamics: no weight decay, as in
    # the S4 code's optimizer groups.
    self.lambda_log_re = param(None, jnp.log(-tile(Lambda).real), self.modes,
                               axes, weight_decay=False)
    self.lambda_im = param(None, tile(Lambda).imag, self.modes, axes,
                           weight_decay=False)
    self.P = complex_param(tile(P), axes, weight_decay=False)
    self.B = complex_param(tile(B), axes, weight_decay=False)
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
    Abar, Bbar = bilinear_conj_dplr(dt, Lambda, P, B)
    s = state.x.reshape(state.x.shape[:-2] + (-1,))             # [B, H, N]
    y, s = dense_recurrence(Abar, Bbar, real_output(C), u, s)
    return (y + self.D[...] * u.astype(jnp.float32),
            SSMState(s.reshape(state.x.shape)))

  def init_state(self, batch_shape) -> SSMState:
    return SSMState.zeros(tuple(batch_shape) + self.modes)

  def flops_per_token(self, seq_len: int) -> float:
    """The "cauchy" kernel per token (four Cauchy sums over the N/2 modes
    and their conjugates at L/2 + 1 frequencies, an inverse FFT), the FFT
    convolution and skip. The dense discretization and Abar^L
    (O(d N^3 log L) per step, whatever the batch) shrink per token as L
    grows and are left out."""
    H, N = self.modes
    return H * (4 * 8 * N + 5 * math.log2(max(seq_len, 2))
                + fft_conv_flops(seq_len) + 2.0)


@register("s4")
class S4(LTIMixer):
  """S4 (Gu, Goel & Re, 2021, "Efficiently Modeling Long Sequences with
  Structured State Spaces", arXiv:2111.00396).

  Per channel, a real N-state SSM x' = A x + B u, y = C x, written in the
  eigenbasis of HiPPO-LegS's normal part as N/2 complex modes and their
  conjugates: A = diag(Lambda_f) - P_f P_f^* with Lambda_f = [Lambda,
  conj Lambda], P_f = [P, conj P] (B, C likewise), output 2 Re(C x). The
  rank-one term couples the halves, so every form sums it over both, as
  the S4 code does; at init the system is exactly HiPPO-LegS
  (A_nk = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k; slowest mode
  -1) up to fp32 rounding, with B as clipped below. P = Q as in the later
  S4 code (with Re(Lambda) < 0, A + A^* is negative definite, so A stays
  stable). Bilinear discretization Abar = (I - dt/2 A)^-1 (I + dt/2 A),
  Bbar = (I - dt/2 A)^-1 dt B; y = K * u + D u with K_l = C Abar^l Bbar;
  output GLU(W GELU(y)). Init: HiPPO-LegS NPLR with Im(V^* B) clipped to
  +-b_clip as the S4 code's `nplr` does (B_clip = 2; None keeps LegS's B:
  at N = 64 the clip changes 11 of 32 modes and the kernel by ~55%, and
  which modes depends on the eigensolver's eigenvector phases, the same in
  numpy and torch here), C complex normal, log dt uniform in
  [log dt_min, log dt_max]. Defaults are the paper's: N = 64,
  dt in [1e-3, 1e-1].

  Kernel ("cauchy", the paper's algorithm): the truncated generating
  function at the roots of unity, sum_l K_l z^l = C~ (I - Abar z)^-1 Bbar
  with C~ = C (I - Abar^L), by the Woodbury identity as four Cauchy sums
  over the N modes at the L/2+1 non-negative frequencies (O(d N L)) and an
  inverse real FFT. C~ needs Abar^L, computed densely (O(d N^3 log L)), so
  C stays the recurrence's C and the layer is one system for every length:
  a departure, as the paper learns C~ directly for a fixed L. "dense":
  Krylov powers of the materialized Abar (O(d N^2 L + d N^3 log L)), all
  matmuls. `dplr_kernel="auto"` takes "cauchy". Abar and Bbar come from a
  Woodbury inverse of the rank-one-corrected diagonal (I - dt/2 A),
  O(d N^2), no LAPACK, as a real N x N system on the (re, im) pairs of the
  kept modes. Precision against the float64 LegS system (fp32, N = 64):
  "cauchy" ~2e-6 relative at the default dt range, ~3e-6 at dt up to 0.5
  and ~5e-6 at L up to 4096 (the Woodbury correction cancels terms
  ~|P|^2 ~ N^2/2 times the kernel); "dense" ~1e-6, ~1e-5 at L = 4096;
  the recurrence ~3e-7. The convolution is FFT, O(d L log L).
  Decode: the recurrence with the real Abar, O(d N^2) per token, a
  constant fp32 state of d N reals, the (re, im) pairs of the N/2 modes
  (exact: a real input keeps the conjugate half conjugate). Everything
  SSM-side is fp32/complex64 for any input dtype.

  Options: state_dim N (even); dt_min, dt_max; b_clip (> 0, or None);
  kernel ("auto" or a CAUSAL_CONV impl); dplr_kernel ("auto" or a
  `layers.kernels.ssm.DPLR_KERNEL` impl).
  """

  info = MixerInfo(family="ssm", paper="Gu et al. 2021, arXiv:2111.00396",
                   train_cost="n log n", decode_state="constant",
                   supports_segments=False)
  kernel_ops = {"kernel": CAUSAL_CONV, "dplr_kernel": DPLR_KERNEL}

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, state_dim: int = 64,
               dt_min: float = 1e-3, dt_max: float = 1e-1,
               b_clip: float | None = 2.0, kernel: str = "auto",
               dplr_kernel: str = "auto"):
    self.core = DPLRSSM(d_model, state_dim, rngs=rngs, dt_min=dt_min,
                        dt_max=dt_max, b_clip=b_clip,
                        kernel=kernel, dplr_kernel=dplr_kernel)
    self.out = GatedOutput(d_model, "glu", rngs=rngs)
