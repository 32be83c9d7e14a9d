"""H3: Hungry Hungry Hippos."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.blocks.conv import ShortConv
from layers.blocks.ssm import S4DSSM, SSMState
from layers.kernels.fftconv import CAUSAL_CONV
from layers.mixers import register
from layers.mixers.base import Mixer, MixerInfo
from layers.params import Dense


@struct.dataclass
class H3Cache:
  """shift: the last shift_dim - 1 keys [B, shift_dim-1, heads, head_dim]
  (activation dtype); ssm: the diagonal SSM state over the K V outer
  products [B, head_dim, head_dim, heads, N/2] (fp32 pairs)."""
  shift: jax.Array
  ssm: SSMState


@register("h3")
class H3(Mixer):
  """H3 (Fu, Dao, Saab, Thomas, Rudra & Re, 2023, "Hungry Hungry Hippos:
  Towards Language Modeling with State Space Models", arXiv:2212.14052).

  Q, K, V = x W_q, x W_k, x W_v (heads x head_dim). Per head:
    K~ = SSM_shift(K):  K~_t = sum_{i<shift_dim} c_i K_{t-i}  (shift matrix A,
                        B = e_1: a learned causal depthwise conv; its tap
                        on K_t is the paper's skip D_k)
    S_t = SSM_diag(K~ V^T)_t   (an S4D SSM per head, shared by the
                        head_dim x head_dim channels of the outer product,
                        with skip D)
    O_t = Q_t S_t  (1 x head_dim times head_dim x head_dim),
  then y = O W_o. With head_dim = 1 it is the paper's single-head form
  Q * SSM_diag(SSM_shift(K) * V).

  Training: the shift as a short conv O(L d shift_dim); the diagonal SSM
  by Vandermonde kernel and FFT causal convolution over d * head_dim
  channels, O(L log L d head_dim). Decode: a shift register of
  shift_dim - 1 keys and the diagonal state of d * head_dim * N/2 complex
  values: constant. The diagonal SSM (kernel, convolution, state) is
  fp32/complex64 for any input dtype.

  Options: head_dim (divides d_model); state_dim N of the diagonal SSM
  (S4D-Lin, ZOH); shift_dim (taps of the shift SSM); dt_min, dt_max;
  kernel: "auto" or a `layers.kernels.fftconv.CAUSAL_CONV` impl.
  """

  info = MixerInfo(family="ssm", paper="Fu et al. 2023, arXiv:2212.14052",
                   train_cost="n log n", decode_state="constant",
                   supports_segments=False)
  kernel_ops = {"kernel": CAUSAL_CONV}

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, head_dim: int = 8,
               state_dim: int = 64, shift_dim: int = 64, dt_min: float = 1e-3,
               dt_max: float = 1e-1, kernel: str = "auto"):
    if head_dim < 1 or d_model % head_dim:
      raise ValueError(f"head_dim={head_dim} must divide d_model={d_model}")
    heads = d_model // head_dim
    self.head_dim = head_dim

    def proj():
      return Dense(d_model, (heads, head_dim), in_axes=("embed",),
                   out_axes=("heads", "head_dim"), rngs=rngs, use_bias=True)

    self.q, self.k, self.v = proj(), proj(), proj()
    self.o = Dense((heads, head_dim), d_model, in_axes=("heads", "head_dim"),
                   out_axes=("embed",), rngs=rngs, use_bias=True)
    self.shift = ShortConv((heads, head_dim), shift_dim, rngs=rngs,
                           axes=("heads", "head_dim"), use_bias=False)
    self.ssm = S4DSSM(heads, state_dim, rngs=rngs, dt_min=dt_min, dt_max=dt_max,
                      kernel=kernel, axis="heads")

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    q, k, v = self.q(x), self.k(x), self.v(x)                  # [B, L, H, d]
    k, shift_state = self.shift(k, None if cache is None else cache.shift)
    kv = jnp.moveaxis(k[..., :, None] * v[..., None, :], 2, -1)  # [B, L, d, d, H]
    if cache is None:
      s = self.ssm(kv)
    else:
      s, ssm_state = self.ssm.step(kv, cache.ssm)
    o = jnp.einsum("blhi,blijh->blhj", q.astype(jnp.float32), s)
    y = self.o(o.astype(x.dtype))
    return y if cache is None else (y, H3Cache(shift_state, ssm_state))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    d = self.head_dim
    return H3Cache(self.shift.init_state(batch_size, dtype),
                   self.ssm.init_state((batch_size, d, d)))

  def flops_per_token(self, seq_len):
    projections = 2.0 * sum(m.kernel.size for m in (self.q, self.k, self.v, self.o))
    heads, d = self.ssm.modes[0], self.head_dim
    # outer products K~ V^T and the Q S contraction: heads * d^2 each.
    return (projections + self.shift.flops_per_token() + 4.0 * heads * d * d
            + self.ssm.flops_per_token(seq_len, copies=d * d))
