"""Mamba's selective scan (S6): the pure-JAX forms and the op.

SELECTIVE_SCAN (Gu & Dao 2023): per channel d and state index n,
    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n]
  "sequential": `lax.scan` over time, one [B, D, N] state.
  "chunked":   `lax.scan` over chunks of T positions; inside a chunk an
               associative scan over [B, T, D, N], then the output
               contraction. The chunk body is rematerialized in the
               backward pass, so the expanded state is only ever held for
               one chunk (what the fused CUDA kernel does in SRAM).
  "pallas_gpu": `layers.kernels.pallas.scan_selective_gpu`, the fused scan
               in Mosaic GPU (d_state <= 16); the first choice on GPU.

(Mamba-2's SSD has one scalar decay per head, which makes it decayed
linear attention: it runs on `layers.kernels.linear_attention`.)

Both forms take an initial state h0 (None = zeros) and reset_BxL (True
where the state is zeroed before that step, for packed segments; None =
never), and return (y, final state). All arithmetic is fp32 whatever the
input dtype (decays and states drift in bf16); y and the state come back
fp32. The chunked form pads the tail with dt = 0, which leaves the state
unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from layers.kernels import Impl, Op, chunks
from layers.kernels.linear_recurrence import combine
from layers.kernels.pallas import scan_selective_gpu

F32 = jnp.float32


def _jit(fn):
  """Compiled once per shape, so eager (unjitted) mixer calls do not
  dispatch the scans op by op; inlined under an outer jit."""
  return jax.jit(fn, static_argnames=("chunk_size",))


def _f32(*arrays):
  return [a.astype(F32) for a in arrays]


def _resets(reset_BxL, B, L):
  return jnp.zeros((B, L), bool) if reset_BxL is None else reset_BxL


def s6_sequential(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN, *, h0=None,
                  reset_BxL=None, chunk_size=None):
  """The recurrence, one step at a time (chunk_size is not used)."""
  del chunk_size
  Bsz, L, D = x_BxLxD.shape
  x, dt, A, Bm, Cm = _f32(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN)
  h0 = jnp.zeros((Bsz, D, A.shape[1]), F32) if h0 is None else h0.astype(F32)

  def step(h_BxDxN, inp):
    x_t, dt_t, B_t, C_t, r_t = inp
    h = jnp.where(r_t[:, None, None], 0.0, h_BxDxN)
    h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * x_t)[..., None] * B_t[:, None]
    return h, jnp.einsum("bdn,bn->bd", h, C_t)

  time_major = [jnp.swapaxes(a, 0, 1) for a in
                (x, dt, Bm, Cm, _resets(reset_BxL, Bsz, L))]
  h, y_LxBxD = jax.lax.scan(step, h0, time_major)
  return jnp.swapaxes(y_LxBxD, 0, 1), h


def s6_chunked(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN, *, h0=None,
               reset_BxL=None, chunk_size=64):
  """Associative scan within chunks of `chunk_size`, carried across."""
  Bsz, L, D = x_BxLxD.shape
  T = min(chunk_size, L)
  x, dt, A, Bm, Cm = _f32(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN)
  h0 = jnp.zeros((Bsz, D, A.shape[1]), F32) if h0 is None else h0.astype(F32)
  chunk_major = [jnp.swapaxes(chunks.split(a, T), 0, 1)
                 for a in (x, dt, Bm, Cm, _resets(reset_BxL, Bsz, L))]

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk(h_BxDxN, inp):
    x_c, dt_c, B_c, C_c, r_c = inp                          # [B, T, ...]
    a_BxTxDxN = jnp.where(r_c[..., None, None], 0.0,
                          jnp.exp(dt_c[..., None] * A))
    b_BxTxDxN = (dt_c * x_c)[..., None] * B_c[:, :, None]
    a_cum, h_local = jax.lax.associative_scan(combine, (a_BxTxDxN, b_BxTxDxN),
                                              axis=1)
    h_all = a_cum * h_BxDxN[:, None] + h_local
    return h_all[:, -1], jnp.einsum("btdn,btn->btd", h_all, C_c)

  h, y_CxBxTxD = jax.lax.scan(chunk, h0, chunk_major)
  return chunks.merge(jnp.swapaxes(y_CxBxTxD, 0, 1), L), h


# The pure-JAX forms: every platform runs them, and they are the oracles.
FORMS = ("chunked", "sequential")

SELECTIVE_SCAN = Op(
    "selective_scan",
    impls={"chunked": Impl("chunked", _jit(s6_chunked)),
           "sequential": Impl("sequential", _jit(s6_sequential)),
           "pallas_gpu": scan_selective_gpu.IMPL},
    # On CPU the plain scan is the faster one (about 3x for fwd+bwd at
    # d_inner=256, L=512): the associative scan and its recompute only pay
    # off where the steps would otherwise run serially on a wide device.
    # On GPU the fused kernel keeps the [D, N] states in registers.
    order={"cpu": ("sequential", "chunked"),
           "gpu": ("pallas_gpu", "chunked", "sequential"),
           "default": ("chunked", "sequential")},
)


def s6_flops_per_token(form: str, d_inner: int, d_state: int) -> float:
  """Forward FLOPs per token of one selective scan over [D, N] elements.

  sequential: discretize (dt*A, dt*x*B: 3), update (a*h + b: 2) and read
  out (C.h: 2) each element. chunked: the same, but the associative scan
  does about two combines (3 each) per element instead of one update, and
  the carried state is applied afterwards (2). pallas_gpu: as sequential
  (one step per element).
  """
  per_element = {"sequential": 7.0, "chunked": 13.0, "pallas_gpu": 7.0}
  return per_element[form] * d_inner * d_state
