"""What the Mosaic GPU kernels share: register layouts, wgmma operands in
shared memory, and `Ops`, which runs the same kernel code compiled or in
Mosaic GPU interpret mode (jax 0.10.2's interpreter has no rule for layout
casts or transposed shared-memory views, so there loads are plain and a
transposed wgmma operand is copied transposed)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

F32 = jnp.float32
WG = plgpu.Layout.WGMMA
COL = WG.reduce(1)  # a vector along rows: broadcast over columns
ROW = WG.reduce(0)  # a vector along columns: broadcast over rows


def tiled(shape, dtype):
  """Shared memory laid out for wgmma operands (8-row tiles, swizzled)."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(shape[-1] * bits)
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, swizzle * 8 // bits)),
      plgpu.SwizzleTransform(swizzle)))


def cols(x, shape):
  """A COL vector broadcast to `shape` (each row one value)."""
  return lax.broadcast_in_dim(x, shape, [0])


def rows(x, shape):
  """A ROW vector broadcast to `shape` (each column one value)."""
  return lax.broadcast_in_dim(x, shape, [1])


@dataclasses.dataclass(frozen=True)
class Ops:
  """Register layouts and wgmma, compiled or interpreted (module docstring).
  `interpret`: False, or the Mosaic GPU interpret parameters."""
  interpret: object

  def cast(self, x, layout):
    return x if self.interpret else plgpu.layout_cast(x, layout)

  def load(self, ref, layout, idx=()):
    """ref[idx] in `layout`; plain (unswizzled) shared memory may need a
    transfer with bank conflicts, which `optimized=False` allows."""
    if self.interpret:
      return ref[idx]
    return plgpu.load(ref, idx, layout=layout, optimized=False)

  def iota(self, shape, dim):
    return self.cast(lax.broadcasted_iota(jnp.int32, shape, dim), WG)

  def mm(self, a, b, *, ta=False, tb=False):
    """a @ b (a^T, b^T if ta, tb) of shared-memory refs, fp32 [M, N]."""
    M = a.shape[1] if ta else a.shape[0]
    N = b.shape[0] if tb else b.shape[1]

    def wgmma(a, b):
      def run(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]
      return pl.run_scoped(run, plgpu.ACC((M, N), F32))

    if not self.interpret:
      view = lambda r, t: plgpu.transpose_ref(r, (1, 0)) if t else r
      return wgmma(view(a, ta), view(b, tb))
    copies = [tiled(r.shape[::-1], r.dtype) for r, t in ((a, ta), (b, tb)) if t]

    def with_copies(*tmp):
      tmp = list(tmp)
      operands = []
      for r, t in ((a, ta), (b, tb)):
        if t:
          r_t = tmp.pop(0)
          r_t[...] = r[...].T
          r = r_t
        operands.append(r)
      return wgmma(*operands)

    return pl.run_scoped(with_copies, *copies) if copies else wgmma(a, b)

  def stage(self, ref, value):
    """Write an operand for the following wgmmas."""
    ref[...] = value.astype(ref.dtype)
    plgpu.commit_smem()
