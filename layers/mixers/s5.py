"""S5: a MIMO diagonal state space layer with a parallel scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.blocks.ssm import (GatedOutput, SSMState, as_complex,
                               check_state_dim, complex_param, hippo_legs_nplr,
                               log_dt_param, normal_param)
from layers.kernels.linear_recurrence import LINEAR_RECURRENCE, linear_scan
from layers.kernels.ssm import check_discretization, discretize_diag
from layers.mixers import register
from layers.mixers.base import Mixer, MixerInfo
from layers.params import param
from layers.positions import segment_starts

HIGHEST = jax.lax.Precision.HIGHEST


@register("s5")
class S5(Mixer):
  """S5 (Smith, Warrington & Linderman, 2023, "Simplified State Space
  Layers for Sequence Modeling", arXiv:2208.04933).

  One multi-input multi-output SSM over all d_model channels, diagonal in
  its P-dimensional state (P/2 complex modes of conjugate pairs):
    x_t = Abar x_{t-1} + Bbar u_t,  y_t = 2 Re(C~ x_t) + D u_t,
  Lambda from HiPPO-N (the normal part of HiPPO-LegS), B~ = V^-1 B and
  C~ = C V in its eigenbasis (B, C real, LeCun-normal), a timescale dt per
  mode, ZOH (default) or bilinear discretization. Output:
  g * sigmoid(W g), g = GELU(y) (the S5 code's gated unit).

  Training: jax.lax.associative_scan over (Abar, Bbar u_t) pairs, O(L P)
  work and O(log L) depth, plus O(L d P) for the B and C products; packed
  rows reset the state at segment starts (Abar_t = 0 there), so segments
  are supported exactly. Decode: the sequential recurrence, a constant
  fp32 state of P/2 complex values. The scan and state are complex64 for
  any input dtype.

  Options: state_dim P (even); discretization "zoh" | "bilinear"; dt_min,
  dt_max; kernel: "auto" or a `layers.kernels.linear_recurrence` impl (the
  full form; decode always steps sequentially).
  """

  info = MixerInfo(family="ssm", paper="Smith et al. 2023, arXiv:2208.04933",
                   train_cost="linear", decode_state="constant",
                   supports_segments=True)
  kernel_ops = {"kernel": LINEAR_RECURRENCE}

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, state_dim: int = 64,
               discretization: str = "zoh", dt_min: float = 1e-3,
               dt_max: float = 1e-1, kernel: str = "auto"):
    Lambda, _, _, V = hippo_legs_nplr(check_state_dim(state_dim))
    self.discretization = check_discretization(discretization)
    self.kernel = kernel
    modes = state_dim // 2
    self.lambda_log_re = param(None, jnp.asarray(np.log(-Lambda.real)), (modes,),
                               ("state",), weight_decay=False)
    self.lambda_im = param(None, jnp.asarray(Lambda.imag), (modes,), ("state",),
                           weight_decay=False)
    key_b, key_c = rngs.params(), rngs.params()
    B = jax.random.normal(key_b, (state_dim, d_model)) / np.sqrt(d_model)
    C = jax.random.normal(key_c, (d_model, state_dim)) / np.sqrt(state_dim)
    # jnp, not np: B and C are traced when the model is built under jit.
    # S5's optimizer keeps Lambda, B and log dt out of weight decay.
    self.B = complex_param(jnp.asarray(V.conj().T) @ B, ("state", "embed"),
                           weight_decay=False)
    self.C = complex_param(C @ jnp.asarray(V), ("embed", "state"))
    self.D = normal_param(rngs, (d_model,), ("embed",))
    self.log_dt = log_dt_param(rngs, (modes,), ("state",), dt_min, dt_max)
    self.out = GatedOutput(d_model, "half_glu", rngs=rngs)

  def system(self):
    """Abar [P/2], Bbar [P/2, d], C~ [d, P/2], complex."""
    A = jax.lax.complex(-jnp.exp(self.lambda_log_re[...]), self.lambda_im[...])
    log_a, b = discretize_diag(jnp.exp(self.log_dt[...]), A, self.discretization)
    return jnp.exp(log_a), b[:, None] * as_complex(self.B), as_complex(self.C)

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    u = x.astype(jnp.float32)
    a, Bbar, C = self.system()
    bu = jnp.einsum("blh,nh->bln", u.astype(jnp.complex64), Bbar, precision=HIGHEST)
    if cache is None:
      a = jnp.broadcast_to(a, bu.shape)
      if segment_ids is not None:
        a = jnp.where(segment_starts(segment_ids)[..., None], 0, a)
      states, last = linear_scan(a, bu, jnp.zeros_like(bu[:, 0]), self.kernel)
    else:
      states, last = linear_scan(a, bu, cache.complex(), "sequential")
    y = 2.0 * jnp.einsum("bln,hn->blh", states, C, precision=HIGHEST).real
    y = self.out((y + self.D[...] * u).astype(x.dtype))
    return y if cache is None else (y, SSMState.of(last))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    # Constant-size fp32 state: neither max_len nor dtype changes it.
    return SSMState.zeros((batch_size, self.log_dt.shape[0]))

  def flops_per_token(self, seq_len):
    modes, d = self.B.shape[:2]
    # Bbar u (complex x real) and Re(C~ x): 2 real multiply-adds per entry
    # each; the associative scan ~2 combines of ~14 real FLOPs per mode.
    return 8.0 * d * modes + 28.0 * modes + 2.0 * d + self.out.flops_per_token()
