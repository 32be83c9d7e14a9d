"""The diagonal linear scan h_t = a_t h_{t-1} + b_t on GPU (Pallas, Mosaic GPU).

One more implementation of `layers.kernels.linear_recurrence`'s op
(a, b [B, L, C], h0 [B, C] -> every h_t and the last, fp32). One
`plgpu.kernel` program (one warpgroup, a thread per channel) per batch row
and block of 128 channels walks the time blocks of T = 32 steps in order:
TMA brings the next block of a and b into shared memory while the current
one is scanned step by step (the state in registers), and each block of h
goes back by TMA. The backward pass is the same kernel run from the end
(`_scan_common`).

`declines` reads platform ("gpu") and dtype (real floating). Any L and C
(padded to the blocks).

Verified on CPU: equality with the `sequential` form in Mosaic GPU
interpret mode (barriers and asynchronous copies simulated; its race
detector finds no race), and lowering
to the Mosaic GPU custom call through `jax.export`. Not yet run on a GPU.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from layers.kernels import Impl
from layers.kernels.pallas._scan_common import (
    F32, declines_scan, make_linear_recurrence)

TIME_BLOCK = 32
CHANNELS = 128  # one warpgroup, a thread per channel


def _update(a_t, b_t, h):
  return a_t * h + b_t


def _scan_kernel(a_gmem, b_gmem, h0_gmem, h_gmem, last_gmem, a_smem, b_smem,
                 h_smem, state_smem, loaded, h0_loaded, *, reverse):
  T, CB = a_smem.shape[1:]
  N = a_gmem.shape[1] // T
  i, cs = lax.axis_index("batch"), pl.ds(lax.axis_index("channels") * CB, CB)
  steps = lambda n: pl.ds((N - 1 - n if reverse else n) * T, T)

  def fetch(n, slot):
    for gmem, smem in ((a_gmem, a_smem), (b_gmem, b_smem)):
      plgpu.copy_gmem_to_smem(gmem.at[i, steps(n), cs], smem.at[slot],
                              loaded.at[slot])

  plgpu.copy_gmem_to_smem(h0_gmem.at[i, cs], state_smem, h0_loaded)
  fetch(0, 0)
  plgpu.barrier_wait(h0_loaded)

  def block(n, h):
    slot = lax.rem(n, 2)

    @pl.when(n + 1 < N)
    def _prefetch():  # into the slot block n - 1 has finished reading
      fetch(n + 1, 1 - slot)

    plgpu.barrier_wait(loaded.at[slot])
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # block n - 2's h is out
    a, b, h_out = a_smem.at[slot], b_smem.at[slot], h_smem.at[slot]

    def step(t, h):
      t = T - 1 - t if reverse else t
      h = _update(a[t], b[t], h)
      h_out[t] = h
      return h

    h = lax.fori_loop(0, T, step, h)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_out, h_gmem.at[i, steps(n), cs])
    return h

  state_smem[...] = lax.fori_loop(0, N, block, state_smem[...])
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(state_smem, last_gmem.at[i, cs])
  plgpu.wait_smem_to_gmem(0)


def _scan(static, a, b, h0, *, reverse):
  T, CB, interpret = static
  B, Lp, Cp = a.shape
  block = plgpu.SMEM((2, T, CB), F32)
  return plgpu.kernel(
      functools.partial(_scan_kernel, reverse=reverse),
      out_type=[jax.ShapeDtypeStruct((B, Lp, Cp), F32),
                jax.ShapeDtypeStruct((B, Cp), F32)],
      scratch_types=[block, block, block, plgpu.SMEM((CB,), F32),
                     plgpu.Barrier(num_arrivals=2, num_barriers=2),
                     plgpu.Barrier()],
      grid=(B, Cp // CB), grid_names=("batch", "channels"),
      interpret=interpret or None)(a, b, h0)


linear_recurrence = make_linear_recurrence(
    _scan, lambda L, C: (TIME_BLOCK, CHANNELS))


def declines(**query) -> str | None:
  """Reads platform and dtype."""
  return declines_scan(query, "gpu", "pallas_gpu")


IMPL = Impl("pallas_gpu", linear_recurrence, declines)
