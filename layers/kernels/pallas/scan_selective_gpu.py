"""Mamba's selective scan (S6), fused, on GPU (Pallas, Mosaic GPU).

One more implementation of `layers.kernels.selective_scan`'s op:
    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n]
with an initial state, resets (the state zeroed before a step) and the
final state. The expanded [B, L, D, N] state never reaches global memory:
one program (a warpgroup, a thread per channel) per batch row and block of
128 channels keeps its N states in registers and walks the time blocks in
order, TMA bringing x, dt, B, C and the resets of the next block while the
current one is scanned step by step. It also writes the state entering
each time block ([B, L/T, N, D], N / T of the expanded size).

Backward (custom VJP): the same programs walk the time blocks from the
end. Each block's states are recomputed from its entering state into
shared memory, then the reverse recurrence runs step by step with
G_t = dLoss/dh_t in registers:
    G_t += C_t gy_t;  dx_t, ddt_t, dB_t, dC_t from G_t, h_t, h_{t-1};
    dA += G_t h_{t-1} a_t dt_t;  G_{t-1} = a_t G_t.
dB and dC are summed over each program's channels there and over the
channel blocks by XLA; dA over the batch by XLA.

All arithmetic is fp32; y and the final state come back fp32, as the op's
other forms. `declines` reads platform ("gpu"), dtype (real floating) and
d_state (at most 16: the states and their gradients live in registers).
Any L and D (padded: time with dt = 0, which leaves the state as it is;
channels with zeros).

Verified on CPU: equality with the `sequential` form in Mosaic GPU
interpret mode (its race detector finds no race), and lowering to the Mosaic GPU custom call through
`jax.export`. Not yet run on a GPU. Speed, not yet tuned: the per-step
sums over channels for dB and dC are cross-thread reductions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from layers.kernels import Impl

F32 = jnp.float32
TIME_BLOCK = 16
CHANNELS = 128  # one warpgroup, a thread per channel
MAX_STATE = 16
# The resets travel as column 0 of [B, L, 4]: a TMA row needs 16 bytes and
# a copy a multiple of 128.
RESET_COLS = 4


def _decays(dt_t, A, keep):
  """a_t[n] = exp(dt_t A[:, n]), zero where the state resets."""
  return [jnp.exp(dt_t * A_n) * keep for A_n in A]


def _state_before(hs_s, h_s, t, n):
  """h_{t-1}[n] in the backward pass: the block's recomputed states, or the
  state entering the block at its first step."""
  return jnp.where(t > 0, hs_s[jnp.maximum(t - 1, 0), n], h_s[n])


def _forward_kernel(x_g, dt_g, b_g, c_g, r_g, at_g, h0_g, y_g, entering_g,
                    final_g, x_s, dt_s, b_s, c_s, r_s, y_s, at_s, h_s, loaded,
                    once):
  T, DB = x_s.shape[1:]
  N = at_s.shape[0]
  NB = x_g.shape[1] // T
  i, cs = lax.axis_index("batch"), pl.ds(lax.axis_index("channels") * DB, DB)
  steps = lambda blk: pl.ds(blk * T, T)
  plgpu.copy_gmem_to_smem(at_g.at[:, cs], at_s, once)
  plgpu.copy_gmem_to_smem(h0_g.at[i, :, cs], h_s, once)

  def fetch(blk, slot):
    for gmem, smem in ((x_g.at[i, steps(blk), cs], x_s), (dt_g.at[i, steps(blk), cs], dt_s),
                       (b_g.at[i, steps(blk)], b_s), (c_g.at[i, steps(blk)], c_s),
                       (r_g.at[i, steps(blk)], r_s)):
      plgpu.copy_gmem_to_smem(gmem, smem.at[slot], loaded.at[slot])

  fetch(0, 0)
  plgpu.barrier_wait(once)
  A = [at_s[n] for n in range(N)]

  def block(blk, h):
    slot = lax.rem(blk, 2)

    @pl.when(blk + 1 < NB)
    def _prefetch():
      fetch(blk + 1, 1 - slot)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # y_s and h_s are free
    for n in range(N):
      h_s[n] = h[n]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_s, entering_g.at[i, blk, :, cs])
    plgpu.barrier_wait(loaded.at[slot])
    x, dt, b, c, r = (s.at[slot] for s in (x_s, dt_s, b_s, c_s, r_s))

    def step(t, h):
      dt_t = dt[t]
      a = _decays(dt_t, A, 1.0 - r[t, 0])
      u = dt_t * x[t]
      h = [a[n] * h[n] + u * b[t, n] for n in range(N)]
      y_s[t] = sum(c[t, n] * h[n] for n in range(N))
      return h

    h = lax.fori_loop(0, T, step, h)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_s, y_g.at[i, steps(blk), cs])
    return h

  h = lax.fori_loop(0, NB, block, [h_s[n] for n in range(N)])
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  for n in range(N):
    h_s[n] = h[n]
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(h_s, final_g.at[i, :, cs])
  plgpu.wait_smem_to_gmem(0)


def _backward_kernel(x_g, dt_g, b_g, c_g, r_g, at_g, gy_g, entering_g,
                     gfinal_g, dx_g, ddt_g, db_g, dc_g, dat_g, dh0_g, x_s,
                     dt_s, b_s, c_s, r_s, gy_s, at_s, h_s, hs_s, vec_s, dx_s,
                     ddt_s, db_s, dc_s, loaded, once):
  T, DB = x_s.shape
  N = at_s.shape[0]
  NB = x_g.shape[1] // T
  i, j = lax.axis_index("batch"), lax.axis_index("channels")
  cs = pl.ds(j * DB, DB)
  steps = lambda blk: pl.ds(blk * T, T)
  plgpu.copy_gmem_to_smem(at_g.at[:, cs], at_s, once)
  plgpu.copy_gmem_to_smem(gfinal_g.at[i, :, cs], vec_s, once)
  plgpu.barrier_wait(once)
  A = [at_s[n] for n in range(N)]

  def block(k, carry):
    G, dA = carry
    blk = NB - 1 - k
    for gmem, smem in ((x_g.at[i, steps(blk), cs], x_s), (dt_g.at[i, steps(blk), cs], dt_s),
                       (b_g.at[i, steps(blk)], b_s), (c_g.at[i, steps(blk)], c_s),
                       (r_g.at[i, steps(blk)], r_s), (gy_g.at[i, steps(blk), cs], gy_s),
                       (entering_g.at[i, blk, :, cs], h_s)):
      plgpu.copy_gmem_to_smem(gmem, smem, loaded)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last block's outputs are out
    plgpu.barrier_wait(loaded)

    def recompute(t, h):  # hs_s[t] = h_t within the block
      dt_t = dt_s[t]
      a = _decays(dt_t, A, 1.0 - r_s[t, 0])
      u = dt_t * x_s[t]
      h = [a[n] * h[n] + u * b_s[t, n] for n in range(N)]
      for n in range(N):
        hs_s[t, n] = h[n]
      return h

    lax.fori_loop(0, T, recompute, [h_s[n] for n in range(N)])

    def step(k, carry):
      G, dA = carry
      t = T - 1 - k
      dt_t, x_t, gy_t = dt_s[t], x_s[t], gy_s[t]
      a = _decays(dt_t, A, 1.0 - r_s[t, 0])
      du = jnp.zeros_like(dt_t)  # d(dt_t x_t)
      ddt = jnp.zeros_like(dt_t)
      G_prev, dA_new = [], []
      for n in range(N):
        h_t = hs_s[t, n]
        h_before = _state_before(hs_s, h_s, t, n)
        g = G[n] + c_s[t, n] * gy_t  # dLoss/dh_t
        dc_s[t, n] = jnp.sum(gy_t * h_t)
        db_s[t, n] = jnp.sum(g * dt_t * x_t)
        du = du + g * b_s[t, n]
        d_logit = g * h_before * a[n]  # d(dt_t A_n)
        ddt = ddt + d_logit * A[n]
        dA_new.append(dA[n] + d_logit * dt_t)
        G_prev.append(a[n] * g)
      dx_s[t] = du * dt_t
      ddt_s[t] = ddt + du * x_t
      return G_prev, dA_new

    G, dA = lax.fori_loop(0, T, step, (G, dA))
    plgpu.commit_smem()
    for smem, gmem in ((dx_s, dx_g.at[i, steps(blk), cs]),
                       (ddt_s, ddt_g.at[i, steps(blk), cs]),
                       (db_s, db_g.at[i, j, steps(blk)]),
                       (dc_s, dc_g.at[i, j, steps(blk)])):
      plgpu.copy_smem_to_gmem(smem, gmem)
    return G, dA

  # Zeros in the loaded arrays' register layout (a loop carry keeps its
  # layout; jnp.zeros would be a splat).
  zeros = [0.0 * A_n for A_n in A]
  G, dA = lax.fori_loop(0, NB, block, ([vec_s[n] for n in range(N)], zeros))
  plgpu.wait_smem_to_gmem(0)
  for value, gmem in ((G, dh0_g), (dA, dat_g)):
    for n in range(N):
      vec_s[n] = value[n]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(vec_s, gmem.at[i, :, cs])
    plgpu.wait_smem_to_gmem(0)


# -- launches and the custom VJP --------------------------------------------

def _launch(kernel, out_shapes, scratch, B, Dp, arrivals, interpret):
  return plgpu.kernel(
      kernel, out_type=[jax.ShapeDtypeStruct(s, F32) for s in out_shapes],
      scratch_types=[plgpu.SMEM(s, F32) for s in scratch] + arrivals,
      grid=(B, Dp // CHANNELS), grid_names=("batch", "channels"),
      interpret=interpret or None)


def _forward(interpret, x, dt, At, Bm, Cm, r):
  def run(h0T):
    B, Lp, Dp = x.shape
    N, T, DB = At.shape[0], TIME_BLOCK, CHANNELS
    return _launch(
        _forward_kernel,
        [(B, Lp, Dp), (B, Lp // T, N, Dp), (B, N, Dp)],
        [(2, T, DB), (2, T, DB), (2, T, N), (2, T, N), (2, T, RESET_COLS),
         (T, DB), (N, DB), (N, DB)],
        B, Dp, [plgpu.Barrier(num_arrivals=5, num_barriers=2),
                plgpu.Barrier(num_arrivals=2)], interpret)(
                    x, dt, Bm, Cm, r, At, h0T)
  return run


def _backward(interpret, x, dt, At, Bm, Cm, r, gy, entering, gfinal):
  B, Lp, Dp = x.shape
  N, T, DB = At.shape[0], TIME_BLOCK, CHANNELS
  nd = Dp // DB
  return _launch(
      _backward_kernel,
      [(B, Lp, Dp), (B, Lp, Dp), (B, nd, Lp, N), (B, nd, Lp, N), (B, N, Dp),
       (B, N, Dp)],
      [(T, DB), (T, DB), (T, N), (T, N), (T, RESET_COLS), (T, DB), (N, DB), (N, DB),
       (T, N, DB), (N, DB), (T, DB), (T, DB), (T, N), (T, N)],
      B, Dp, [plgpu.Barrier(num_arrivals=7), plgpu.Barrier(num_arrivals=2)],
      interpret)(x, dt, Bm, Cm, r, At, gy, entering, gfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(interpret, x, dt, At, Bm, Cm, r, h0T):
  y, _, final = _forward(interpret, x, dt, At, Bm, Cm, r)(h0T)
  return y, final


def _core_fwd(interpret, x, dt, At, Bm, Cm, r, h0T):
  y, entering, final = _forward(interpret, x, dt, At, Bm, Cm, r)(h0T)
  return (y, final), (x, dt, At, Bm, Cm, r, entering)


def _core_bwd(interpret, res, cotangents):
  x, dt, At, Bm, Cm, r, entering = res
  gy, gfinal = cotangents
  dx, ddt, dB, dC, dAt, dh0T = _backward(interpret, x, dt, At, Bm, Cm, r, gy,
                                         entering, gfinal)
  return (dx, ddt, dAt.sum(0), dB.sum(1), dC.sum(1), jnp.zeros_like(r), dh0T)


_core.defvjp(_core_fwd, _core_bwd)


def selective_scan(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN, *, h0=None,
                   reset_BxL=None, chunk_size=None, interpret=False):
  """The op's signature (chunk_size unused: the kernel has its own time
  blocks); `interpret`: False or Mosaic GPU interpret parameters."""
  del chunk_size
  Bsz, L, D = x_BxLxD.shape
  N = A_DxN.shape[1]
  if N > MAX_STATE:
    raise ValueError(f"pallas_gpu selective scan: d_state must be at most "
                     f"{MAX_STATE} (the states live in registers), got {N}")
  arrays = (x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN, h0)
  if any(a is not None and not jnp.issubdtype(a.dtype, jnp.floating)
         for a in arrays):
    raise ValueError("pallas_gpu selective scan: x, dt, A, B, C and h0 must "
                     "be real floating arrays")
  T = TIME_BLOCK
  Lp, Dp, Np = -(-L // T) * T, -(-D // CHANNELS) * CHANNELS, -(-N // 4) * 4
  pad = lambda a, *widths: jnp.pad(a.astype(F32), [(0, w) for w in widths])
  x, dt = (pad(a, 0, Lp - L, Dp - D) for a in (x_BxLxD, dt_BxLxD))
  Bm, Cm = (pad(a, 0, Lp - L, Np - N) for a in (B_BxLxN, C_BxLxN))
  r = jnp.zeros((Bsz, L), F32) if reset_BxL is None else reset_BxL.astype(F32)
  r = jnp.pad(r[..., None], [(0, 0), (0, 0), (0, RESET_COLS - 1)])
  h0 = jnp.zeros((Bsz, D, N), F32) if h0 is None else h0
  y, final = _core(interpret, x, dt, pad(A_DxN, Dp - D, Np - N).T, Bm, Cm,
                   pad(r, 0, Lp - L, 0), jnp.swapaxes(pad(h0, 0, Dp - D, Np - N), 1, 2))
  return y[:, :L, :D], jnp.swapaxes(final, 1, 2)[:, :D, :N]


def declines(**query) -> str | None:
  """Reads platform, dtype and d_state."""
  if query.get("platform") != "gpu":
    return f"pallas_gpu runs on gpu, not {query.get('platform')}"
  for key in ("dtype", "d_state"):
    if key not in query:
      return f"the caller did not state {key}"
  if not jnp.issubdtype(query["dtype"], jnp.floating):
    return f"dtype {jnp.dtype(query['dtype']).name} (the kernel scans real floats)"
  if query["d_state"] > MAX_STATE:
    return f"d_state {query['d_state']} (at most {MAX_STATE}: the states live in registers)"
  return None


IMPL = Impl("pallas_gpu", selective_scan, declines)
