"""The diagonal linear scan h_t = a_t h_{t-1} + b_t on TPU (Pallas, Mosaic TPU).

One more implementation of `layers.kernels.linear_recurrence`'s op
(a, b [B, L, C], h0 [B, C] -> every h_t and the last, fp32), the form of
RG-LRU and of any real diagonal recurrence. Grid (batch, channel block,
time block), the time blocks in order ("arbitrary") with the state [1, CB]
in the resident last-state block. Within a block of T steps the scan is
associative: log2(T) Hillis-Steele steps over the whole [T, CB] tile, the
earlier partial products brought alongside by rotating sublanes
(`pltpu.roll`), then h = A_cum * h_in + B_cum. The backward pass is the
same kernel run from the end (`_scan_common`).

`declines` reads platform ("tpu") and dtype (real floating; the complex
diagonal scan of S5/S4D declines). Any L and C (padded
to the blocks: T = 128 steps, CB = 128 lanes when C is a multiple of 128,
else all of C).

Verified on CPU: equality with the `sequential` form in TPU interpret mode
(`pltpu.InterpretParams`) and lowering through `jax.export`; Mosaic's
layout passes run only on a TPU, not yet done.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu

from layers.kernels import Impl
from layers.kernels.pallas._scan_common import (
    F32, declines_scan, make_linear_recurrence)

TIME_BLOCK = 128
LANES = 128


def _block_scan(a_TxC, b_TxC, reverse: bool):
  """Inclusive scan of the maps h -> a h + b along the block's steps (from
  its end if `reverse`): (A, B) with h_t = A_t h_in + B_t."""
  T = a_TxC.shape[0]
  t = lax.broadcasted_iota(jnp.int32, (T, 1), 0)
  A, B = a_TxC, b_TxC
  offset = 1
  while offset < T:
    shift = T - offset if reverse else offset  # earlier steps come alongside
    has_earlier = t < T - offset if reverse else t >= offset
    A_e, B_e = pltpu.roll(A, shift, 0), pltpu.roll(B, shift, 0)
    B = jnp.where(has_earlier, A * B_e + B, B)
    A = jnp.where(has_earlier, A * A_e, A)
    offset *= 2
  return A, B


def _scan_kernel(a_ref, b_ref, h0_ref, h_ref, last_ref, *, reverse):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    last_ref[...] = h0_ref[...]

  A, B = _block_scan(a_ref[...], b_ref[...], reverse)
  h = A * last_ref[...] + B
  h_ref[...] = h
  T = h.shape[0]
  last_ref[...] = h[:1] if reverse else h[T - 1:]


def _scan(static, a, b, h0, *, reverse):
  T, CB, interpret = static
  B, Lp, Cp = a.shape
  N = Lp // T
  step = (lambda n: N - 1 - n) if reverse else (lambda n: n)
  tile = pl.BlockSpec((None, T, CB), lambda i, j, n: (i, step(n), j))
  state = pl.BlockSpec((None, 1, CB), lambda i, j, n: (i, 0, j))
  h, last = pl.pallas_call(
      functools.partial(_scan_kernel, reverse=reverse),
      grid=(B, Cp // CB, N), in_specs=[tile, tile, state],
      out_specs=[tile, state],
      out_shape=[jax.ShapeDtypeStruct((B, Lp, Cp), F32),
                 jax.ShapeDtypeStruct((B, 1, Cp), F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret)(a, b, h0[:, None])
  return h, last[:, 0]


def _blocks(L, C):
  return (min(TIME_BLOCK, -(-L // 8) * 8),
          LANES if C % LANES == 0 else C)


linear_recurrence = make_linear_recurrence(_scan, _blocks)


def declines(**query) -> str | None:
  """Reads platform and dtype."""
  return declines_scan(query, "tpu", "pallas_tpu")


IMPL = Impl("pallas_tpu", linear_recurrence, declines)
