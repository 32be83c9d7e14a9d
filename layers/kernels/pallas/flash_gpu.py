"""Flash attention on GPU (Pallas, Mosaic GPU; Hopper wgmma): forward and
backward.

One more implementation of `layers.kernels.attention`'s op, by
FlashAttention-2's algorithm (Dao, 2023, arXiv:2307.08691) with the block
bounds and masks of `layers.kernels.flash.Plan`; the glue is
`flash_common`. Each `plgpu.kernel` program is one warpgroup. Forward: one
program per (batch, head, query block of 64) walks the key blocks it can
see (causal diagonal, window), loading each key and value block by TMA,
S = Q K^T by wgmma into fp32 registers, the online softmax there
(m, l as row vectors), P staged in shared memory in 16 bits and
acc += P V by wgmma. Backward: one program per key block accumulates
dK = dS^T Q and dV = P^T dO over the query blocks that see it, one per
query block accumulates dQ = dS K, each recomputing P = exp(S - lse) and
dS = P * (dO V^T - rowsum(dO * O)); dK and dV come out per query head and
are summed over each GQA group in XLA.

Causal, sliding window, segment ids, GQA/MQA and the soft-cap are computed
per block from positions and ids. Matmul operands are 16-bit (P and dS
included, as in FlashAttention); statistics and accumulators are fp32.

`declines` reads platform ("gpu"), dtype (bfloat16 or float16: fp32 would
run as tf32 in wgmma), head_dim (64 or 128), alibi (declined) and q_offset
(a traced one declines). Any length: T and S are padded to 64.

Verified on CPU: equality with `attention.reference` in Mosaic GPU
interpret mode and lowering to the Mosaic GPU custom call through
`jax.export`. Not yet run on a GPU: PTX compilation, the hardware's
synchronization and the speed are verified only when one runs it. Not
tuned: loads are synchronous (no TMA pipelining across key blocks, no
warp specialization as in FlashAttention-3), which is why the op keeps
cuDNN first on GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from layers.kernels import Impl
from layers.kernels.pallas._gpu_common import COL, ROW, WG, Ops, cols, rows, tiled
from layers.kernels.pallas.flash_common import (
    F32, Kernels, declines_flash, make_attention, unsupported)

BLOCK = 64  # one wgmma tile of rows
HEAD_DIMS = (64, 128)
DTYPES16 = ("bfloat16", "float16")


def _load(pairs, barrier):
  """TMA (gmem, smem) pairs in, on one barrier, and wait for them."""
  for src, dst in pairs:
    plgpu.copy_gmem_to_smem(src, dst, barrier)
  plgpu.barrier_wait(barrier)


def _scores(ops, plan, q_offset, q_s, k_s, i, j, segs):
  """Masked fp32 scores [bq, bk] of query block i against key block j,
  and tanh(s / softcap) (for the backward) or None. segs: None or the
  (query, key) segment ids of the blocks in shared memory."""
  s = ops.mm(q_s, k_s, tb=True) * plan.scale
  t = None
  if plan.softcap is not None:
    t = jnp.tanh(s / plan.softcap)
    s = plan.softcap * t
  shape = s.shape
  q_pos = q_offset + i * shape[0] + ops.iota(shape, 0)
  k_pos = j * shape[1] + ops.iota(shape, 1)
  visible = plan.visible(q_pos, k_pos)
  if segs is not None:
    same = (cols(ops.load(segs[0], COL), shape)
            == rows(ops.load(segs[1], ROW), shape))
    visible = same if visible is None else visible & same
  if visible is not None:
    s = jnp.where(visible, s, -jnp.inf)
  return s, t


def _grad_scores(ops, plan, q_offset, blocks, i, j, segs):
  """P and dS * scale (fp32 [bq, bk]) of one block pair; blocks holds the
  shared-memory q, k, v, dO, lse and delta."""
  q_s, k_s, v_s, do_s, lse_s, delta_s = blocks
  s, t = _scores(ops, plan, q_offset, q_s, k_s, i, j, segs)
  shape = s.shape
  p = jnp.exp(s - cols(ops.load(lse_s, COL), shape))
  ds = p * (ops.mm(do_s, v_s, tb=True) - cols(ops.load(delta_s, COL), shape))
  if t is not None:  # d(c tanh(x / c)) = (1 - tanh^2) dx
    ds = ds * (1.0 - t * t)
  return p, ds * plan.scale


class _Program:
  """One program's refs: the gmem inputs q, k, v [, dO, lse, delta] (and
  segment ids), the outputs, and the shared-memory blocks they load into
  by TMA (layout in `_scratch`)."""

  def __init__(self, refs, *, segments, grads, n_out, interpret):
    n_in = 6 if grads else 3
    refs = list(refs)
    self.gmem, refs = refs[:n_in], refs[n_in:]
    self.seg_g = None
    if segments:
      self.seg_g, refs = refs[:2], refs[2:]
    self.outs, refs = refs[:n_out], refs[n_out:]
    self.smem, refs = refs[:n_in], refs[n_in:]
    self.w_s, qseg_s, kseg_s, self.q_in, self.kv_in = refs
    self.segs = (qseg_s, kseg_s) if segments else None
    self.ops = Ops(interpret)
    self.b, self.h = lax.axis_index("batch"), lax.axis_index("heads")
    q_g, k_g = self.gmem[:2]
    self.hk = lax.div(self.h, q_g.shape[1] // k_g.shape[1])
    self.bq, self.K = self.smem[0].shape
    self.bk = self.smem[1].shape[0]

  def query_rows(self, i):
    return pl.ds(i * self.bq, self.bq)

  def key_rows(self, j):
    return pl.ds(j * self.bk, self.bk)

  def load_queries(self, i):
    """Query block i of q [, dO, lse, delta] and its segment ids."""
    rows, b, h = self.query_rows(i), self.b, self.h
    pairs = [(self.gmem[n].at[b, h, rows], self.smem[n])
             for n in (0, *range(3, len(self.gmem)))]  # all but k, v
    if self.segs is not None:
      pairs.append((self.seg_g[0].at[b, rows], self.segs[0]))
    _load(pairs, self.q_in)

  def load_keys(self, j):
    """Key block j of k and v and its segment ids."""
    rows, b, hk = self.key_rows(j), self.b, self.hk
    pairs = [(self.gmem[1].at[b, hk, rows], self.smem[1]),
             (self.gmem[2].at[b, hk, rows], self.smem[2])]
    if self.segs is not None:
      pairs.append((self.seg_g[1].at[b, rows], self.segs[1]))
    _load(pairs, self.kv_in)


def _forward_kernel(*refs, plan, q_offset, segments, interpret):
  pr = _Program(refs, segments=segments, grads=False, n_out=2, interpret=interpret)
  (o_g, lse_g), (q_s, k_s, v_s), p_s, ops = pr.outs, pr.smem, pr.w_s, pr.ops
  i = lax.axis_index("blocks")
  pr.load_queries(i)

  def visit(j, carry):
    m, l, acc = carry
    pr.load_keys(j)
    s, _ = _scores(ops, plan, q_offset, q_s, k_s, i, j, pr.segs)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # A row that has seen no visible key yet keeps m = -inf; shift by 0.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - cols(m_safe, s.shape))
    rescale = jnp.exp(m - m_safe)
    ops.stage(p_s, p)
    acc = cols(rescale, acc.shape) * acc + ops.mm(p_s, v_s)
    return m_new, rescale * l + jnp.sum(p, axis=1), acc

  init = (ops.cast(jnp.full((pr.bq,), -jnp.inf, F32), COL),
          ops.cast(jnp.zeros((pr.bq,), F32), COL),
          ops.cast(jnp.zeros((pr.bq, pr.K), F32), WG))
  m, l, acc = lax.fori_loop(*plan.key_blocks(i, q_offset), visit, init)
  seen = l > 0  # a row that sees no key returns 0, lse = +inf
  l = jnp.where(seen, l, 1.0)
  rows = pr.query_rows(i)
  o_g[pr.b, pr.h, rows] = (acc / cols(l, acc.shape)).astype(o_g.dtype)
  lse_g[pr.b, pr.h, rows] = jnp.where(seen, m + jnp.log(l), jnp.inf)


def _dkv_kernel(*refs, plan, q_offset, segments, interpret):
  pr = _Program(refs, segments=segments, grads=True, n_out=2, interpret=interpret)
  (dk_g, dv_g), ops, w_s = pr.outs, pr.ops, pr.w_s
  q_s, do_s = pr.smem[0], pr.smem[3]
  j = lax.axis_index("blocks")
  pr.load_keys(j)

  def visit(i, carry):
    dk, dv = carry
    pr.load_queries(i)
    p, ds = _grad_scores(ops, plan, q_offset, pr.smem, i, j, pr.segs)
    ops.stage(w_s, p)
    dv = dv + ops.mm(w_s, do_s, ta=True)
    ops.stage(w_s, ds)
    return dk + ops.mm(w_s, q_s, ta=True), dv

  zeros = ops.cast(jnp.zeros((pr.bk, pr.K), F32), WG)
  dk, dv = lax.fori_loop(*plan.query_blocks(j, q_offset), visit, (zeros, zeros))
  rows = pr.key_rows(j)
  dk_g[pr.b, pr.h, rows] = dk
  dv_g[pr.b, pr.h, rows] = dv


def _dq_kernel(*refs, plan, q_offset, segments, interpret):
  pr = _Program(refs, segments=segments, grads=True, n_out=1, interpret=interpret)
  (dq_g,), ops, w_s, k_s = pr.outs, pr.ops, pr.w_s, pr.smem[1]
  i = lax.axis_index("blocks")
  pr.load_queries(i)

  def visit(j, dq):
    pr.load_keys(j)
    _, ds = _grad_scores(ops, plan, q_offset, pr.smem, i, j, pr.segs)
    ops.stage(w_s, ds)
    return dq + ops.mm(w_s, k_s)

  dq = lax.fori_loop(*plan.key_blocks(i, q_offset), visit,
                     ops.cast(jnp.zeros((pr.bq, pr.K), F32), WG))
  dq_g[pr.b, pr.h, pr.query_rows(i)] = dq


# -- kernel launches -------------------------------------------------------

def _scratch(plan, K, dtype, grads: bool, segments: bool):
  """Shared memory: q, k, v, [dO, lse, delta], the staged P / dS, the
  segment ids, then one barrier per group of loads (query side, key side)."""
  bq, bk = plan.bq, plan.bk
  blocks = [tiled((bq, K), dtype), tiled((bk, K), dtype), tiled((bk, K), dtype)]
  if grads:
    blocks += [tiled((bq, K), dtype), plgpu.SMEM((bq,), F32), plgpu.SMEM((bq,), F32)]
  blocks.append(tiled((bq, bk), dtype))
  blocks += [plgpu.SMEM((bq,), jnp.int32), plgpu.SMEM((bk,), jnp.int32)]
  q_loads = (4 if grads else 1) + segments
  return blocks + [plgpu.Barrier(num_arrivals=q_loads),
                   plgpu.Barrier(num_arrivals=2 + segments)]


def _launch(kernel, static, segs, grid_blocks, args, out_type, grads):
  plan, q_offset, interpret = static
  B, H, _, K = args[0].shape
  seg_args = [] if segs is None else [segs[0][..., 0], segs[1][:, 0]]
  return plgpu.kernel(
      functools.partial(kernel, plan=plan, q_offset=q_offset,
                        segments=segs is not None, interpret=interpret),
      out_type=out_type,
      scratch_types=_scratch(plan, K, args[0].dtype, grads, segs is not None),
      grid=(B, H, grid_blocks), grid_names=("batch", "heads", "blocks"),
      interpret=interpret or None)(*args, *seg_args)


def _forward(static, q, k, v, segs):
  plan = static[0]
  B, H, Tp, K = q.shape
  o, lse = _launch(_forward_kernel, static, segs, plan.nq, [q, k, v],
                   [jax.ShapeDtypeStruct(q.shape, q.dtype),
                    jax.ShapeDtypeStruct((B, H, Tp), F32)], grads=False)
  return o, lse[..., None]


def _backward(static, q, k, v, segs, do, lse, delta):
  plan = static[0]
  B, H, Tp, K = q.shape
  Sp = k.shape[2]
  args = [q, k, v, do, lse[..., 0], delta[..., 0]]
  dk, dv = _launch(_dkv_kernel, static, segs, plan.nk, args,
                   [jax.ShapeDtypeStruct((B, H, Sp, K), F32)] * 2, grads=True)
  dq = _launch(_dq_kernel, static, segs, plan.nq, args,
               jax.ShapeDtypeStruct(q.shape, F32), grads=True)
  return dq, dk, dv


def _blocks(T, S):
  return BLOCK, BLOCK


def _cannot_run(*, dtype, head_dim, **facts) -> str | None:
  if jnp.dtype(dtype).name not in DTYPES16:
    return f"dtype {jnp.dtype(dtype).name} (the kernel takes {' or '.join(DTYPES16)})"
  if head_dim not in HEAD_DIMS:
    return f"head_dim {head_dim} (the kernel takes {HEAD_DIMS})"
  return unsupported(dtype=dtype, **facts)


attention = make_attention(Kernels(_forward, _backward), _blocks, "pallas_gpu",
                           _cannot_run)


def declines(**query) -> str | None:
  """Reads platform, dtype, head_dim, alibi and q_offset."""
  return declines_flash(query, "gpu", "pallas_gpu", _cannot_run)


IMPL = Impl("pallas_gpu", attention, declines)
