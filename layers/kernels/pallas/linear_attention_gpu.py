"""Chunked linear attention on GPU (Pallas, Mosaic GPU; Hopper wgmma).

One more implementation of `layers.kernels.linear_attention`'s op:
S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, for scalar
(per head), per-key-channel (GLA) or no decay, segment resets, an initial
and a final state; forward and backward kernels tied by a custom VJP. The
split into passes and what each kernel reads: `_linear_common`. Each
`plgpu.kernel` program is one warpgroup: the state pass one per (batch,
head), walking the chunks in order with the fp32 state [V, K] in wgmma
accumulator registers; the output and gradient passes one per (batch,
head, chunk). Operands reach shared memory by TMA; every matmul is a wgmma
of 16-bit operands from shared memory with an fp32 accumulator, so a chunk
is one 64-row wgmma tile (C = 64).

Intra-chunk decay. Scalar: A = (q k^T) * exp(b_t - b_s), the exponent
masked before exp. Per key channel (GLA's secondary chunking, sub-chunks
of 16): pairs in different sub-chunks factor exp(b_t - b_s) =
exp(b_t - r) exp(r - b_s) around r, the cumulative decay at the sub-chunk
boundary (both factors <= 1); as wgmma tiles are 64 rows, that is one
full-chunk wgmma per later sub-chunk with the other rows masked (three in
place of the one score matmul of a scalar decay). Pairs inside one
sub-chunk are exact fp32 products, one key column at a time. The
gradients use the same split.

Precision: matmul operands are 16-bit (the state read by the queries and
the emitted per-chunk states included, as flash-linear-attention does);
accumulation, exponentials, the carried state and the gradients are fp32.
fp32 inputs decline (wgmma would run them as tf32).

`declines` reads the query keys platform ("gpu"), dtype (bfloat16 or
float16), chunk_size (64), key_dim and value_dim (64 or 128) and decay
("none", "scalar" or "channel"): per-channel decay with key_dim = value_dim
= 128 declines, its gradient pass needing 216 KiB of shared memory (over
a 200 KiB budget); larger heads need the value dimension split across
programs, not done yet. A length that is not a chunk multiple is padded;
any segment layout; Hk dividing H.

Verified on CPU: equality with the pure-JAX forms in Mosaic GPU interpret
mode (its race detector finds no race in the three kernels), and lowering
to the Mosaic GPU custom call (register layouts, wgmma operand layouts and
TMA shapes are checked there) through `jax.export`. Two things differ
when interpreting, as jax 0.10.2's interpreter has no rule for them
(`_gpu_common.Ops`): register layouts are not named (plain loads, no layout casts),
and wgmma operands used transposed are copied transposed in shared memory
instead of read through a transposed view. Not yet run on a GPU: PTX
compilation, the hardware's synchronization and the speed are verified
only when one runs it.

Speed, not yet tuned: the output and gradient passes take one chunk per
program and rely on occupancy to hide their TMA loads; the state pass
loads each chunk synchronously; the per-channel band is a 64-step loop of
[64, K] vector work per matmul.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from layers.kernels import Impl
from layers.kernels.pallas._gpu_common import (
    COL, ROW, WG, Ops as _Ops, cols as _cols, rows as _rows, tiled as _tiled)
from layers.kernels.pallas._linear_common import (
    F32, SUB_CHUNK, Kernels, check_common, declines_common,
    make_linear_attention)

CHUNK = 64  # one wgmma tile of rows
HEAD_DIMS = (64, 128)
# Of the 227 KiB a Hopper block may use; the rest is left to Mosaic's own
# scratch (cross-warp reductions) and barriers.
SMEM_BUDGET = 200 * 1024
DECAYS = ("none", "scalar", "channel")
DTYPES16 = ("bfloat16", "float16")
# -- decay helpers (per chunk; `b` [C] COL for scalar decay, [C, K] WG per
#    channel; `start` [C] COL) ---------------------------------------------

def _q_scale(b, start_col, shape):
  """Q~ = q * this: the decay since the chunk start for queries that read
  the entering state."""
  if b.ndim == 1:
    return _cols(jnp.where(start_col < 0, jnp.exp(b), 0.0), shape)
  return jnp.where(_cols(start_col, shape) < 0, jnp.exp(b), 0.0)


def _k_scale(b, b_last, start_col, start_last, shape):
  """K~ = k * this: the decay to the chunk end for keys whose segment
  reaches it (start_s >= start_{C-1}: s is in the last token's segment)."""
  reaches = start_col >= start_last
  if b.ndim == 1:
    return _cols(jnp.where(reaches, jnp.exp(b_last - b), 0.0), shape)
  return jnp.where(_cols(reaches, shape), jnp.exp(_rows(b_last, shape) - b), 0.0)


def _carry(b_last, start_last):
  """gamma: how the entering state survives the chunk (scalar or ROW [K])."""
  return jnp.where(start_last < 0, jnp.exp(b_last), 0.0)


def _mask(row, col, start_col):
  """M[t, s]: key s is visible to query t (start_t <= s <= t)."""
  return (col <= row) & (col >= _cols(start_col, row.shape))


def _mask_t(row, col, start_row):
  """M^T[s, t] = M[t, s], start as a ROW vector (indexed by t)."""
  return (row <= col) & (row >= _rows(start_row, row.shape))


class _Chunk:
  """One chunk's decay and segment data, read from shared memory: b_s
  ([C] fp32 for scalar decay, [C, K] per channel) and st_s ([C] int32)."""

  def __init__(self, ops, b_s, st_s, K):
    C = st_s.shape[0]
    self.ops, self.b_s, self.C, self.K = ops, b_s, C, K
    self.channel = b_s.ndim == 2
    self.start = ops.load(st_s, COL)
    self.start_last = st_s[C - 1]
    if self.channel:
      self.b = ops.load(b_s, WG)
      self.b_last = self.b_at(C - 1)
    else:
      self.b = ops.load(b_s, COL)
      self.b_last = b_s[C - 1]
    self.t, self.s = ops.iota((C, C), 0), ops.iota((C, C), 1)
    self.mask = _mask(self.t, self.s, self.start)

  def b_at(self, t):
    """Per channel: the cumulative decay of token t, ROW [K]."""
    return self.ops.load(self.b_s, ROW, t)

  def q_scale(self):
    return _q_scale(self.b, self.start, (self.C, self.K))

  def k_scale(self):
    return _k_scale(self.b, self.b_last, self.start, self.start_last,
                    (self.C, self.K))

  def carry(self):
    return _carry(self.b_last, self.start_last)

  def decay(self):
    """Scalar decay: exp(b_t - b_s) where visible, else 0, [C, C]."""
    shape = (self.C, self.C)
    b_row = self.ops.load(self.b_s, ROW)
    return jnp.exp(jnp.where(self.mask, _cols(self.b, shape)
                             - _rows(b_row, shape), -jnp.inf))


def _scores(ops, ch, q_s, k_s, kp_s, stage_q, stage_k):
  """A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk) where visible, fp32 [C, C].
  Per channel, kp_s (plain [C, K], for reading rows) and two staging
  buffers are written."""
  if not ch.channel:
    return ops.mm(q_s, k_s, tb=True) * ch.decay()
  C, K, c = ch.C, ch.K, SUB_CHUNK
  q = ops.load(q_s, WG).astype(F32)
  k = ops.load(k_s, WG).astype(F32)
  kp_s[...] = k.astype(kp_s.dtype)
  row = ops.iota((C, K), 0)
  A = jnp.zeros((C, C), F32)
  for lo in range(c, C, c):  # keys of earlier sub-chunks, around b_{lo-1}
    r = _rows(ch.b_at(lo - 1), (C, K))
    mine = (row >= lo) & (row < lo + c)
    ops.stage(stage_q, q * jnp.exp(jnp.where(mine, ch.b - r, -jnp.inf)))
    ops.stage(stage_k, k * jnp.exp(jnp.where(row < lo, r - ch.b, -jnp.inf)))
    A = A + ops.mm(stage_q, stage_k, tb=True)

  def band(s, A):  # key s against the queries of its own sub-chunk
    k_s_row = _rows(ops.load(kp_s, ROW, s).astype(F32), (C, K))
    b_s_row = _rows(ch.b_at(s), (C, K))
    mine = (row >= s) & (row < (lax.div(s, c) + 1) * c)
    A_s = jnp.sum(q * k_s_row * jnp.exp(jnp.where(mine, ch.b - b_s_row,
                                                  -jnp.inf)), axis=1)
    return A + jnp.where(ch.s == s, _cols(A_s, (C, C)), 0.0)

  A = lax.fori_loop(0, C, band, A)
  return jnp.where(ch.mask, A, 0.0)


def _apply(ops, ch, W, X, xp_s, stage_w, stage_x, causal: bool):
  """Per channel: Y[u] = sum_w W[u, w] X[w] exp(b_u - b_w) over w <= u
  (causal) or exp(b_w - b_u) over w >= u; W [C, C] masked, X [C, K] (q or
  k, exact in xp_s's 16 bits; written there to read rows). dq: (dA, k);
  dk: (dA^T, q)."""
  C, K, c = ch.C, ch.K, SUB_CHUNK
  xp_s[...] = X.astype(xp_s.dtype)
  row, col = ops.iota((C, K), 0), ch.s
  Y = jnp.zeros((C, K), F32)
  for lo in range(0, C, c):
    hi = lo + c
    if (lo == 0) if causal else (hi == C):
      continue
    r = _rows(ch.b_at(lo - 1 if causal else hi - 1), (C, K))
    mine = (row >= lo) & (row < hi)
    if causal:  # inputs before the sub-chunk, around b_{lo-1}
      ops.stage(stage_w, jnp.where((ch.t >= lo) & (ch.t < hi) & (col < lo), W, 0.0))
      ops.stage(stage_x, X * jnp.exp(jnp.where(row < lo, r - ch.b, -jnp.inf)))
      Y = Y + jnp.exp(jnp.where(mine, ch.b - r, -jnp.inf)) * ops.mm(stage_w, stage_x)
    else:  # inputs after the sub-chunk, around b_{hi-1}
      ops.stage(stage_w, jnp.where((ch.t >= lo) & (ch.t < hi) & (col >= hi), W, 0.0))
      ops.stage(stage_x, X * jnp.exp(jnp.where(row >= hi, ch.b - r, -jnp.inf)))
      Y = Y + jnp.exp(jnp.where(mine, r - ch.b, -jnp.inf)) * ops.mm(stage_w, stage_x)

  def band(w, Y):  # input w to the outputs of its own sub-chunk
    W_w = _cols(jnp.sum(jnp.where(col == w, W, 0.0), axis=1), (C, K))
    x_w = _rows(ops.load(xp_s, ROW, w).astype(F32), (C, K))
    b_w = _rows(ch.b_at(w), (C, K))
    first = lax.div(w, c) * c
    if causal:
      expo = jnp.where((row >= w) & (row < first + c), ch.b - b_w, -jnp.inf)
    else:
      expo = jnp.where((row <= w) & (row >= first), b_w - ch.b, -jnp.inf)
    return Y + W_w * x_w * jnp.exp(expo)

  return lax.fori_loop(0, C, band, Y)


# -- kernels ---------------------------------------------------------------

def _state_kernel(x_g, y_g, b_g, st_g, s0_g, entering_g, final_g, x_s, y_s,
                  b_s, st_s, xt_s, e_s, f_s, loaded, s0_loaded, *, reverse,
                  interpret):
  ops = _Ops(interpret)
  i, h = lax.axis_index("batch"), lax.axis_index("heads")
  H, N = b_g.shape[1], entering_g.shape[2]
  C, K = x_s.shape
  hx, hy = lax.div(h, H // x_g.shape[1]), lax.div(h, H // y_g.shape[1])
  plgpu.copy_gmem_to_smem(s0_g.at[i, h], f_s, s0_loaded)
  plgpu.barrier_wait(s0_loaded)

  def chunk(n, S):
    n = N - 1 - n if reverse else n
    rows = pl.ds(n * C, C)
    for src, dst in ((x_g.at[i, hx, rows], x_s), (y_g.at[i, hy, rows], y_s),
                     (b_g.at[i, h, rows], b_s), (st_g.at[i, rows], st_s)):
      plgpu.copy_gmem_to_smem(src, dst, loaded)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # e_s is free again
    e_s[...] = S.astype(e_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(e_s, entering_g.at[i, h, n])
    plgpu.barrier_wait(loaded)
    ch = _Chunk(ops, b_s, st_s, K)
    scale = ch.q_scale() if reverse else ch.k_scale()
    ops.stage(xt_s, ops.load(x_s, WG).astype(F32) * scale)
    gamma = ch.carry()
    if ch.channel:
      gamma = _rows(gamma, S.shape)
    return S * gamma + ops.mm(y_s, xt_s, ta=True)

  S = lax.fori_loop(0, N, chunk, ops.load(f_s, WG))
  plgpu.wait_smem_to_gmem(0)
  f_s[...] = S
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(f_s, final_g.at[i, h])
  plgpu.wait_smem_to_gmem(0)


def _load(pairs, barrier):
  """TMA (gmem, smem) pairs in, on one barrier, and wait for them."""
  for src, dst in pairs:
    plgpu.copy_gmem_to_smem(src, dst, barrier)
  plgpu.barrier_wait(barrier)


def _store(value, smem, gmem):
  smem[...] = value.astype(smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(smem, gmem)
  plgpu.wait_smem_to_gmem(0)


def _prologue(k_g, b_g, C, interpret):
  """This program's ops, its (batch, head, chunk) indices, its kv head (GQA:
  H // Hkv query heads share one) and its chunk's C rows."""
  i, h, n = (lax.axis_index(a) for a in ("batch", "heads", "chunks"))
  hk = lax.div(h, b_g.shape[1] // k_g.shape[1])
  return _Ops(interpret), i, h, n, hk, pl.ds(n * C, C)


def _forward_kernel(q_g, k_g, v_g, b_g, st_g, s_g, o_g, q_s, k_s, v_s, b_s,
                    st_s, s_s, p_s, qt_s, kt_s, kp_s, o_s, loaded, *,
                    interpret):
  C, K = q_s.shape
  ops, i, h, n, hk, rows = _prologue(k_g, b_g, C, interpret)
  _load(((q_g.at[i, h, rows], q_s), (k_g.at[i, hk, rows], k_s),
         (v_g.at[i, hk, rows], v_s), (b_g.at[i, h, rows], b_s),
         (st_g.at[i, rows], st_s), (s_g.at[i, h, n], s_s)), loaded)
  ch = _Chunk(ops, b_s, st_s, K)
  A = _scores(ops, ch, q_s, k_s, kp_s, qt_s, kt_s)
  ops.stage(p_s, A)
  ops.stage(qt_s, ops.load(q_s, WG).astype(F32) * ch.q_scale())
  o = ops.mm(p_s, v_s) + ops.mm(qt_s, s_s, tb=True)
  _store(o, o_s, o_g.at[i, h, rows])


def _backward_kernel(q_g, k_g, v_g, b_g, st_g, do_g, s_g, r_g, dq_g, dk_g,
                     dv_g, db_g, q_s, k_s, v_s, do_s, b_s, st_s, s_s, r_s,
                     w_s, x_s, x2_s, xp_s, loaded, *, interpret):
  C, K = q_s.shape
  ops, i, h, n, hk, rows = _prologue(k_g, b_g, C, interpret)
  _load(((q_g.at[i, h, rows], q_s), (k_g.at[i, hk, rows], k_s),
         (v_g.at[i, hk, rows], v_s), (do_g.at[i, h, rows], do_s),
         (b_g.at[i, h, rows], b_s), (st_g.at[i, rows], st_s),
         (s_g.at[i, h, n], s_s), (r_g.at[i, h, n], r_s)), loaded)
  ch = _Chunk(ops, b_s, st_s, K)
  q = ops.load(q_s, WG).astype(F32)
  k = ops.load(k_s, WG).astype(F32)
  k_scale = ch.k_scale()
  dq = ops.mm(do_s, s_s) * ch.q_scale()
  dk_inter = ops.mm(v_s, r_s) * k_scale
  ops.stage(x_s, k * k_scale)
  dv = ops.mm(x_s, r_s, tb=True)
  dA = jnp.where(ch.mask, ops.mm(do_s, v_s, tb=True), 0.0)
  if ch.channel:
    A = _scores(ops, ch, q_s, k_s, xp_s, x_s, x2_s)
    dq = dq + _apply(ops, ch, dA, k, xp_s, w_s, x_s, causal=True)
    mask_t = _mask_t(ch.t, ch.s, ops.load(st_s, ROW))
    dA_t = jnp.where(mask_t, ops.mm(v_s, do_s, tb=True), 0.0)
    dk = dk_inter + _apply(ops, ch, dA_t, q, xp_s, w_s, x_s, causal=False)
  else:
    D = ch.decay()
    A = ops.mm(q_s, k_s, tb=True) * D
    ops.stage(w_s, dA * D)
    dq = dq + ops.mm(w_s, k_s)
    dk = dk_inter + ops.mm(w_s, q_s, ta=True)
  ops.stage(w_s, A)
  dv = dv + ops.mm(w_s, do_s, ta=True)
  # d b_t from every exp(+-b_t); the chunk-end decay in K~ and gamma
  # belongs to the last token.
  db = q * dq - k * dk
  St, Rt = ops.load(s_s, WG).astype(F32), ops.load(r_s, WG).astype(F32)
  last = (jnp.sum(k * dk_inter, axis=0)
          + ch.carry() * jnp.sum(St * Rt, axis=0))  # ROW [K]
  if ch.channel:
    db = db + jnp.where(ops.iota((C, K), 0) == C - 1, _rows(last, (C, K)), 0.0)
  else:
    db = jnp.sum(db, axis=1) + jnp.where(
        ops.cast(lax.iota(jnp.int32, C), COL) == C - 1, jnp.sum(last), 0.0)
  # Straight from registers to global memory: staging four fp32 blocks in
  # shared memory for TMA would not fit beside the operands.
  for value, gmem in ((dq, dq_g), (dk, dk_g), (dv, dv_g), (db, db_g)):
    gmem[i, h, rows] = value


# -- kernel launches -------------------------------------------------------

def _smem(kernel: str, C, K, V, G, dt):
  """(shape, dtype, tiled) of each shared-memory buffer of a kernel, in the
  order of its arguments."""
  b = ((C, G) if G > 1 else (C,), F32, False)
  start = ((C,), jnp.int32, False)
  return {
      "state": [((C, K), dt, True), ((C, V), dt, True), b, start,
                ((C, K), dt, True), ((V, K), dt, True), ((V, K), F32, False)],
      "forward": [((C, K), dt, True), ((C, K), dt, True), ((C, V), dt, True),
                  b, start, ((V, K), dt, True), ((C, C), dt, True),
                  ((C, K), dt, True), ((C, K), dt, True), ((C, K), dt, False),
                  ((C, V), dt, True)],
      "backward": [((C, K), dt, True), ((C, K), dt, True), ((C, V), dt, True),
                   ((C, V), dt, True), b, start, ((V, K), dt, True),
                   ((V, K), dt, True), ((C, C), dt, True), ((C, K), dt, True),
                   ((C, K), dt, True), ((C, K), dt, False)],
  }[kernel]


def _scratch(kernel: str, C, K, V, G, dt):
  return [_tiled(shape, dtype) if tiled else plgpu.SMEM(shape, dtype)
          for shape, dtype, tiled in _smem(kernel, C, K, V, G, dt)]


def smem_bytes(K, V, G, dtype) -> int:
  """The most shared memory any of the three kernels allocates."""
  return max(sum(math.prod(shape) * jnp.dtype(dt).itemsize
                 for shape, dt, _ in _smem(kernel, CHUNK, K, V, G, dtype))
             for kernel in ("state", "forward", "backward"))


def _decay_in(b_BxHxLpxG):
  """Scalar decay travels as [B, H, Lp] (a TMA row needs 16 bytes)."""
  return b_BxHxLpxG[..., 0] if b_BxHxLpxG.shape[-1] == 1 else b_BxHxLpxG


def _state_pass(static, x, y, b, start, s0T, *, reverse):
  C, interpret = static
  B, H, Lp, G = b.shape
  N, K, V, dt = Lp // C, x.shape[-1], y.shape[-1], x.dtype
  return plgpu.kernel(
      functools.partial(_state_kernel, reverse=reverse, interpret=interpret),
      out_type=[jax.ShapeDtypeStruct((B, H, N, V, K), dt),
                jax.ShapeDtypeStruct((B, H, V, K), F32)],
      scratch_types=[*_scratch("state", C, K, V, G, dt),
                     plgpu.Barrier(num_arrivals=4), plgpu.Barrier()],
      grid=(B, H), grid_names=("batch", "heads"),
      interpret=_interpret_params(interpret))(
          x, y, _decay_in(b), start[..., 0], s0T)


def _forward(static, q, k, v, b, start, entering):
  C, interpret = static
  B, H, Lp, G = b.shape
  K, V, dt = q.shape[-1], v.shape[-1], q.dtype
  return plgpu.kernel(
      functools.partial(_forward_kernel, interpret=interpret),
      out_type=jax.ShapeDtypeStruct((B, H, Lp, V), v.dtype),
      scratch_types=[*_scratch("forward", C, K, V, G, dt),
                     plgpu.Barrier(num_arrivals=6)],
      grid=(B, H, Lp // C), grid_names=("batch", "heads", "chunks"),
      interpret=_interpret_params(interpret))(
          q, k, v, _decay_in(b), start[..., 0], entering)


def _backward(static, q, k, v, b, start, do, entering, leaving):
  C, interpret = static
  B, H, Lp, G = b.shape
  K, V, dt = q.shape[-1], v.shape[-1], q.dtype
  db_shape = (B, H, Lp, G) if G > 1 else (B, H, Lp)
  dq, dk, dv, db = plgpu.kernel(
      functools.partial(_backward_kernel, interpret=interpret),
      out_type=[jax.ShapeDtypeStruct(s, F32) for s in
                ((B, H, Lp, K), (B, H, Lp, K), (B, H, Lp, V), db_shape)],
      scratch_types=[*_scratch("backward", C, K, V, G, dt),
                     plgpu.Barrier(num_arrivals=8)],
      grid=(B, H, Lp // C), grid_names=("batch", "heads", "chunks"),
      interpret=_interpret_params(interpret))(
          q, k, v, _decay_in(b), start[..., 0], do, entering, leaving)
  return dq, dk, dv, db.reshape(B, H, Lp, G)


def _interpret_params(interpret):
  """`interpret` is False or Mosaic GPU interpret parameters."""
  return interpret or None


def _over_budget(K, V, G, dtype) -> str | None:
  need = smem_bytes(K, V, G, dtype)
  if need > SMEM_BUDGET:
    return (f"key_dim {K}, value_dim {V} with {'per-channel' if G > 1 else 'scalar'}"
            f" decay need {need // 1024} KiB of shared memory, over the "
            f"{SMEM_BUDGET // 1024} KiB budget")
  return None


def _check(q, k, v, log_decay, chunk_size):
  who = "pallas_gpu linear attention"
  check_common(q, k, v, log_decay, who, DTYPES16)
  if chunk_size != CHUNK:
    raise ValueError(f"{who}: chunk_size must be {CHUNK} (one wgmma tile), "
                     f"got {chunk_size}")
  for name, dim in (("key_dim", q.shape[-1]), ("value_dim", v.shape[-1])):
    if dim not in HEAD_DIMS:
      raise ValueError(f"{who}: {name} must be one of {HEAD_DIMS}, got {dim}")
  reason = _over_budget(q.shape[-1], v.shape[-1], log_decay.shape[-1], q.dtype)
  if reason:
    raise ValueError(f"{who}: {reason}")


linear_attention = make_linear_attention(
    Kernels(_state_pass, _forward, _backward), _check)


def declines(**query) -> str | None:
  """Reads platform, dtype, chunk_size, key_dim, value_dim and decay
  ("none", "scalar" or "channel")."""
  reason = declines_common(
      query, "gpu", ("dtype", "chunk_size", "key_dim", "value_dim", "decay"),
      "pallas_gpu", DTYPES16)
  if reason:
    return reason
  if query["chunk_size"] != CHUNK:
    return f"chunk_size {query['chunk_size']} (the kernel's chunk is {CHUNK})"
  for name in ("key_dim", "value_dim"):
    if query[name] not in HEAD_DIMS:
      return f"{name} {query[name]} (the kernel takes {HEAD_DIMS})"
  if query["decay"] not in DECAYS:
    return f"decay {query['decay']!r} (one of {DECAYS})"
  K = query["key_dim"]
  return _over_budget(K, query["value_dim"],
                      K if query["decay"] == "channel" else 1, query["dtype"])


IMPL = Impl("pallas_gpu", linear_attention, declines)
