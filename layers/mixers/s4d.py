"""S4D: diagonal state space layer."""

from __future__ import annotations

from flax import nnx

from layers.blocks.lti import LTIMixer
from layers.blocks.ssm import GatedOutput, S4DSSM
from layers.mixers import register
from layers.mixers.base import MixerInfo


@register("s4d")
class S4D(LTIMixer):
  """S4D (Gu, Gupta, Goel & Re, 2022, "On the Parameterization and
  Initialization of Diagonal State Space Models", arXiv:2206.11893).

  Each of the d_model channels runs its own diagonal SSM with N/2 complex
  modes (conjugate pairs of a real N-state system):
    x_t = Abar x_{t-1} + Bbar u_t,  y_t = 2 Re(C x_t) + D u_t,
  Abar = exp(dt A) (ZOH) or (1 + dt A/2)/(1 - dt A/2) (bilinear); A from
  S4D-Lin (-1/2 + i pi n) or S4D-Inv (-1/2 + i N/pi (N/(2n+1) - 1)). The
  layer output is GLU(W GELU(y)), W: d -> 2d, as in the paper's code.

  Training: the kernel K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l) (a Vandermonde
  product, O(d N L)) and an FFT causal convolution, O(d L log L).
  Decode: the recurrence, a constant fp32 state of d * N/2 complex values.
  Kernel, convolution and state are fp32/complex64 for any input dtype.

  Options: state_dim N (even); init "lin" | "inv"; discretization
  "zoh" | "bilinear"; dt_min, dt_max (log-uniform init of dt); kernel:
  "auto" or a `layers.kernels.fftconv.CAUSAL_CONV` impl.
  """

  info = MixerInfo(family="ssm", paper="Gu et al. 2022, arXiv:2206.11893",
                   train_cost="n log n", decode_state="constant",
                   supports_segments=False)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, state_dim: int = 64,
               init: str = "lin", discretization: str = "zoh",
               dt_min: float = 1e-3, dt_max: float = 1e-1,
               kernel: str = "auto"):
    self.core = S4DSSM(d_model, state_dim, rngs=rngs, init=init,
                       discretization=discretization, dt_min=dt_min,
                       dt_max=dt_max, kernel=kernel)
    self.out = GatedOutput(d_model, "glu", rngs=rngs)
