"""DSS: diagonal state spaces with the softmax-normalized kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.blocks.lti import LTIMixer
from layers.blocks.ssm import (DiagonalLTI, GatedOutput, as_complex,
                               check_state_dim, complex_normal, complex_param,
                               hippo_legs_nplr, log_dt_param, normal_param)
from layers.mixers import register
from layers.mixers.base import MixerInfo
from layers.params import param


def inv_geometric_sum(z: jax.Array, n: int, eps: float = 1e-7) -> jax.Array:
  """1 / sum_{r<n} exp(r z): the denominator of DSS's row-softmax.

  Stable for either sign of Re z: where Re z > 0 the sum is
  exp((n-1) z) sum_r exp(-r z), so the geometric series is always summed
  for |ratio| <= 1 as expm1(n w) / expm1(w). The inverse is DSS's
  reciprocal_eps, conj(s) / (|s|^2 + eps), bounded where the sum vanishes.
  """
  grows = z.real > 0
  w = jnp.where(grows, -z, z)
  s = jnp.expm1(n * w) / jnp.expm1(w)
  inv = s.conj() / (s * s.conj() + eps)
  # where() inside the exp keeps the unused branch finite (no NaN gradient).
  return inv * jnp.exp(-(n - 1) * jnp.where(grows, z, 0.0))


class DSSSSM(DiagonalLTI):
  """DSS-softmax (Gupta et al. 2022): K_l = 2 Re(sum_n w_n / lambda_n *
  exp(l lambda_n dt) / sum_{r<norm_len} exp(r lambda_n dt)). Lambda is
  unconstrained (its real part may turn positive) and starts at the
  diagonal of HiPPO-LegS's normal part; w complex normal."""

  def __init__(self, channels: int, state_dim: int, *, rngs: nnx.Rngs,
               norm_len: int, dt_min: float, dt_max: float, kernel: str):
    if norm_len < 1:
      raise ValueError(f"norm_len must be >= 1, got {norm_len}")
    Lambda = hippo_legs_nplr(check_state_dim(state_dim))[0]
    self.norm_len = norm_len
    self.kernel = kernel
    self.modes = (channels, state_dim // 2)
    self.lambda_re = param(None, jnp.broadcast_to(Lambda.real, self.modes),
                           self.modes, ("embed", "state"), weight_decay=False)
    self.lambda_im = param(None, jnp.broadcast_to(Lambda.imag, self.modes),
                           self.modes, ("embed", "state"), weight_decay=False)
    self.W = complex_param(complex_normal(rngs, self.modes), ("embed", "state"))
    self.log_dt = log_dt_param(rngs, (channels,), ("embed",), dt_min, dt_max)
    self.D = normal_param(rngs, (channels,), ("embed",))

  def system(self):
    lam = jax.lax.complex(self.lambda_re[...], self.lambda_im[...])
    z = lam * jnp.exp(self.log_dt[...])[:, None]
    c = as_complex(self.W) / lam * inv_geometric_sum(z, self.norm_len)
    return z, jnp.ones_like(z), c


@register("dss")
class DSS(LTIMixer):
  """DSS (Gupta, Gu & Berant, 2022, "Diagonal State Spaces are as
  Effective as Structured State Spaces", arXiv:2203.14343), the
  softmax-normalized kernel (DSS_softmax).

  Per channel: K = Re(w Lambda^-1 row-softmax(P)), P_{n,l} = lambda_n l dt,
  with N/2 conjugate-pair modes (K_l = 2 Re(...)); y = K * u + D u, then
  GLU(W GELU(y)). The paper normalizes the softmax over the input length;
  here it is over a fixed horizon `norm_len` (the paper's l_max), which
  keeps the layer the same LTI system for every length and split, so the
  kernel continues past norm_len and the recurrence
  x_t = exp(lambda dt) x_{t-1} + u_t, y_t = 2 Re(c x_t) equals it.
  Lambda is unconstrained: modes with Re(lambda) > 0 grow like
  exp(Re(lambda) dt t), fine in fp32 over the horizon unless
  Re(lambda) dt norm_len exceeds ~80, and unbounded far beyond it.

  Training: kernel O(d N L) (Vandermonde) + FFT causal conv
  O(d L log L). Decode: constant fp32 state of d * N/2 complex values.
  Kernel, convolution and state are fp32/complex64 for any input dtype.

  Options: state_dim N (even); norm_len; dt_min, dt_max; kernel: "auto" or
  a `layers.kernels.fftconv.CAUSAL_CONV` impl.
  """

  info = MixerInfo(family="ssm", paper="Gupta et al. 2022, arXiv:2203.14343",
                   train_cost="n log n", decode_state="constant",
                   supports_segments=False)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, state_dim: int = 64,
               norm_len: int = 1024, dt_min: float = 1e-3, dt_max: float = 1e-1,
               kernel: str = "auto"):
    self.core = DSSSSM(d_model, state_dim, rngs=rngs, norm_len=norm_len,
                       dt_min=dt_min, dt_max=dt_max,
                       kernel=kernel)
    self.out = GatedOutput(d_model, "glu", rngs=rngs)
