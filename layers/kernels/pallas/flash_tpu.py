"""Flash attention on TPU (Pallas, Mosaic TPU): forward and backward.

One more implementation of `layers.kernels.attention`'s op: softmax
attention by FlashAttention-2's algorithm (Dao, 2023, arXiv:2307.08691),
the block bounds and masks of `layers.kernels.flash.Plan`, the glue in
`flash_common`. Per (batch, head, query block) the forward walks the key
blocks ("arbitrary" grid axis) with the online softmax in VMEM scratch:

  m' = max(m, rowmax S_j),  P_j = exp(S_j - m'),
  l' = exp(m - m') l + rowsum P_j,  acc' = exp(m - m') acc + P_j V_j,

and writes o = acc / l and lse = m + log l. Key blocks that query block i
cannot see (above the causal diagonal, outside the window) are skipped:
the step does no work and its index map repeats a visible block, so no
DMA is issued either. The backward is two kernels that recompute
P = exp(S - lse) and dS = P * (dO V^T - rowsum(dO * O)) per block: one per
key block accumulating dK = dS^T Q and dV = P^T dO over the query blocks
that see it, one per query block accumulating dQ = dS K. dK and dV come
out per query head and are summed over each GQA group in XLA.

Causal, sliding window, segment ids (packed rows), GQA/MQA and the logit
soft-cap are computed per block from positions and ids. Matmul operands
are in the inputs' dtype (bf16 inputs: P and dS enter the matmuls in
bf16, as in FlashAttention); statistics and accumulators are fp32; fp32
inputs multiply at Precision.HIGHEST. Cost as `layers.kernels.flash`.

`declines` reads platform ("tpu"), dtype (float32 or bfloat16), head_dim
(a multiple of 8, at most 256), alibi (declined) and q_offset (a traced
one declines: the block bounds are static). Any length: T and S are
padded to the blocks (128, or the length rounded up to 8 when shorter).
The `block_q` / `block_k` options override the blocks (the tests use 16 in
interpret mode); compiled for a TPU they must be multiples of 8, and
block_k of 128 (or the whole padded length) with segment ids, whose key
block lies along lanes.

Verified on CPU: equality with `attention.reference` in TPU interpret mode
(`pltpu.InterpretParams`, VMEM and DMA simulated) and lowering to the
Mosaic custom call through `jax.export`. Mosaic's layout passes run only
when a TPU compiles the kernel, which has not been done yet; the block
sizes are not tuned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu

from layers.kernels import Impl
from layers.kernels.pallas.flash_common import (
    F32, Kernels, declines_flash, make_attention, round_up, unsupported)

BLOCK = 128
HEAD_DIM_MAX = 256

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def _mm(a, b, dims):
  precision = lax.Precision.HIGHEST if a.dtype == F32 else None
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=F32)


def _scores(plan, q_offset, q, k, i, j, seg_refs):
  """Masked fp32 scores [bq, bk] of query block i against key block j,
  and tanh(s / softcap) (for the backward) or None."""
  s = _mm(q, k, _NT) * plan.scale
  t = None
  if plan.softcap is not None:
    t = jnp.tanh(s / plan.softcap)
    s = plan.softcap * t
  shape = s.shape
  q_pos = q_offset + i * shape[0] + lax.broadcasted_iota(jnp.int32, shape, 0)
  k_pos = j * shape[1] + lax.broadcasted_iota(jnp.int32, shape, 1)
  visible = plan.visible(q_pos, k_pos)
  if seg_refs is not None:
    same = seg_refs[0][...] == seg_refs[1][...]  # [bq, 1] == [1, bk]
    visible = same if visible is None else visible & same
  if visible is not None:
    s = jnp.where(visible, s, -jnp.inf)
  return s, t


def _grad_scores(plan, q_offset, q, k, v, do, lse, delta, i, j, seg_refs):
  """P [bq, bk] fp32 and dS (scaled, in q's dtype) of one block pair."""
  s, t = _scores(plan, q_offset, q, k, i, j, seg_refs)
  p = jnp.exp(s - lse)
  ds = p * (_mm(do, v, _NT) - delta)
  if t is not None:  # d(c tanh(x / c)) = (1 - tanh^2) dx
    ds = ds * (1.0 - t * t)
  return p, (ds * plan.scale).astype(q.dtype)


def _split(refs, segments, n_in):
  refs = list(refs)
  ins = refs[:n_in]
  segs = (refs[n_in], refs[n_in + 1]) if segments else None
  return ins, segs, refs[n_in + (2 if segments else 0):]


def _forward_kernel(*refs, plan, q_offset, segments):
  (q_ref, k_ref, v_ref), segs, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = (
      _split(refs, segments, 3))
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, F32)
    l_scr[...] = jnp.zeros(l_scr.shape, F32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

  lo, hi = plan.key_blocks(i, q_offset)

  @pl.when((j >= lo) & (j < hi))
  def _visit():
    v = v_ref[...]
    s, _ = _scores(plan, q_offset, q_ref[...], k_ref[...], i, j, segs)
    m = m_scr[...]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    # A row that has seen no visible key yet keeps m = -inf; shift by 0.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    rescale = jnp.exp(m - m_safe)
    l_scr[...] = rescale * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = rescale * acc_scr[...] + _mm(p.astype(v.dtype), v, _NN)
    m_scr[...] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[...]
    seen = l > 0  # a row that sees no key returns 0, lse = +inf
    o_ref[...] = (acc_scr[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(l), jnp.inf)


def _dkv_kernel(*refs, plan, q_offset, segments):
  ins, segs, outs = _split(refs, segments, 3)
  q_ref, k_ref, v_ref = ins
  do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = outs
  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, F32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, F32)

  lo, hi = plan.query_blocks(j, q_offset)

  @pl.when((i >= lo) & (i < hi))
  def _visit():
    q, do = q_ref[...], do_ref[...]
    p, ds = _grad_scores(plan, q_offset, q, k_ref[...], v_ref[...], do,
                         lse_ref[...], delta_ref[...], i, j, segs)
    dv_scr[...] += _mm(p.astype(do.dtype), do, _TN)
    dk_scr[...] += _mm(ds, q, _TN)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...]
    dv_ref[...] = dv_scr[...]


def _dq_kernel(*refs, plan, q_offset, segments):
  ins, segs, outs = _split(refs, segments, 3)
  q_ref, k_ref, v_ref = ins
  do_ref, lse_ref, delta_ref, dq_ref, dq_scr = outs
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, F32)

  lo, hi = plan.key_blocks(i, q_offset)

  @pl.when((j >= lo) & (j < hi))
  def _visit():
    k = k_ref[...]
    _, ds = _grad_scores(plan, q_offset, q_ref[...], k, v_ref[...],
                         do_ref[...], lse_ref[...], delta_ref[...], i, j, segs)
    dq_scr[...] += _mm(ds, k, _NN)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scr[...]


# -- pallas_calls ---------------------------------------------------------
#
# Grids are (batch, head, outer block, inner block); the inner axis is the
# one accumulated over ("arbitrary"). An index map clamps the inner block
# into the visible range [lo, hi), so a skipped step re-reads the block
# already in VMEM instead of fetching one it will not use.

def _clamp(x, lo, hi, n):
  return jnp.clip(jnp.clip(x, lo, hi - 1), 0, n - 1)


def _specs(plan, q_offset, group, K, segments, queries_outer: bool):
  """BlockSpecs of q, k, v, [segs], do/o-like, lse-like on a grid whose
  third axis is query blocks (queries_outer) or key blocks."""
  bq, bk = plan.bq, plan.bk
  if queries_outer:
    def qi_kj(i, j):
      lo, hi = plan.key_blocks(i, q_offset)
      return i, _clamp(j, lo, hi, plan.nk)
  else:
    def qi_kj(j, i):
      lo, hi = plan.query_blocks(j, q_offset)
      return _clamp(i, lo, hi, plan.nq), j

  def q_map(b, h, x, y):
    return b, h, qi_kj(x, y)[0], 0

  def kv_map(b, h, x, y):
    # lax.div, not //: floor division lowers through sign, which Mosaic
    # lowers only knowing the TPU generation (not so when exporting).
    return b, lax.div(h, group), qi_kj(x, y)[1], 0

  rows = pl.BlockSpec((None, None, bq, K), q_map)
  stat = pl.BlockSpec((None, None, bq, 1), q_map)
  keys = pl.BlockSpec((None, None, bk, K), kv_map)
  segs = []
  if segments:
    segs = [pl.BlockSpec((None, bq, 1), lambda b, h, x, y: (b, qi_kj(x, y)[0], 0)),
            pl.BlockSpec((None, 1, bk), lambda b, h, x, y: (b, 0, qi_kj(x, y)[1]))]
  return rows, keys, segs, stat


def _call(kernel, static, segments, grid, in_specs, out_specs, out_shape,
          scratch):
  plan, q_offset, interpret = static
  return pl.pallas_call(
      functools.partial(kernel, plan=plan, q_offset=q_offset,
                        segments=segments),
      grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, scratch_shapes=scratch, interpret=interpret,
      compiler_params=pltpu.CompilerParams(dimension_semantics=(
          "parallel", "parallel", "parallel", "arbitrary")))


def _seg_args(segs):
  return list(segs) if segs is not None else []


def _forward(static, q, k, v, segs):
  plan, q_offset, _ = static
  B, H, Tp, K = q.shape
  rows, keys, seg_specs, stat = _specs(plan, q_offset, H // k.shape[1], K,
                                       segs is not None, queries_outer=True)
  return _call(
      _forward_kernel, static, segs is not None, (B, H, plan.nq, plan.nk),
      [rows, keys, keys] + seg_specs, [rows, stat],
      [jax.ShapeDtypeStruct(q.shape, q.dtype),
       jax.ShapeDtypeStruct((B, H, Tp, 1), F32)],
      [pltpu.VMEM((plan.bq, 1), F32), pltpu.VMEM((plan.bq, 1), F32),
       pltpu.VMEM((plan.bq, K), F32)])(q, k, v, *_seg_args(segs))


def _backward(static, q, k, v, segs, do, lse, delta):
  plan, q_offset, _ = static
  B, H, Tp, K = q.shape
  Sp, group = k.shape[2], H // k.shape[1]
  args = [q, k, v, *_seg_args(segs), do, lse, delta]

  rows, keys, seg_specs, stat = _specs(plan, q_offset, group, K,
                                       segs is not None, queries_outer=False)
  per_key = pl.BlockSpec((None, None, plan.bk, K), lambda b, h, j, i: (b, h, j, 0))
  dk, dv = _call(
      _dkv_kernel, static, segs is not None, (B, H, plan.nk, plan.nq),
      [rows, keys, keys] + seg_specs + [rows, stat, stat], [per_key, per_key],
      [jax.ShapeDtypeStruct((B, H, Sp, K), F32)] * 2,
      [pltpu.VMEM((plan.bk, K), F32)] * 2)(*args)

  rows, keys, seg_specs, stat = _specs(plan, q_offset, group, K,
                                       segs is not None, queries_outer=True)
  dq = _call(
      _dq_kernel, static, segs is not None, (B, H, plan.nq, plan.nk),
      [rows, keys, keys] + seg_specs + [rows, stat, stat], rows,
      jax.ShapeDtypeStruct(q.shape, F32),
      [pltpu.VMEM((plan.bq, K), F32)])(*args)
  return dq, dk, dv


def _blocks(T, S):
  """128, or the whole length rounded up to 8 (sublanes) when shorter."""
  return min(BLOCK, round_up(T, 8)), min(BLOCK, round_up(S, 8))


def _cannot_run(*, head_dim, **facts) -> str | None:
  if head_dim % 8 or head_dim > HEAD_DIM_MAX:
    return (f"head_dim {head_dim} (the kernel takes multiples of 8 up to "
            f"{HEAD_DIM_MAX})")
  return unsupported(**facts)


attention = make_attention(Kernels(_forward, _backward), _blocks, "pallas_tpu",
                           _cannot_run)


def declines(**query) -> str | None:
  """Reads platform, dtype, head_dim, alibi and q_offset."""
  return declines_flash(query, "tpu", "pallas_tpu", _cannot_run)


IMPL = Impl("pallas_tpu", attention, declines)
