"""Chunked linear attention on TPU (Pallas, Mosaic TPU).

One more implementation of `layers.kernels.linear_attention`'s op:
S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, for scalar
(per head), per-key-channel (GLA) or no decay, segment resets, an initial
and a final state; forward and backward kernels tied by a custom VJP. The
split into passes and what each kernel reads: `_linear_common`. Grids are
(batch, head, chunk); the state pass runs its chunks in order
("arbitrary") with the fp32 state [V, K] in its resident output block, the
output and gradient passes are parallel over chunks.

Intra-chunk decay. Scalar: A = (q k^T) * exp(b_t - b_s), the exponent
masked before exp. Per key channel (GLA's secondary chunking): pairs in
different sub-chunks of 16 factor exp(b_t - b_s) = exp(b_t - r) exp(r - b_s)
around r, the cumulative decay just before the row's sub-chunk (both
factors <= 1), one MXU matmul per sub-chunk; pairs inside one sub-chunk
(offsets 0..15) are exact fp32 products on the VPU, one offset at a time,
keys rolled along sublanes (`pltpu.roll`). The gradients reuse the same
split, with the reference at the end of the sub-chunk for dk.

Precision: matmul operands are in the inputs' dtype (bf16 inputs give bf16
operands, the state read by the queries included, as flash-linear-attention
does); accumulation, exponentials, states and gradients are fp32; fp32
inputs multiply at Precision.HIGHEST.

`declines` reads the query keys platform ("tpu"), dtype (float32 or
bfloat16) and chunk_size (a multiple of 16). Any K and V; a length that is
not a chunk multiple is padded; any segment layout; Hk dividing H.

Verified on CPU: equality with the pure-JAX forms in TPU interpret mode
(`pltpu.InterpretParams`, which simulates VMEM and DMA) and lowering to the
Mosaic custom call through `jax.export`. Mosaic's layout passes run only
when a TPU compiles the kernel, which has not been done yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu

from layers.kernels import Impl
from layers.kernels.pallas._linear_common import (
    F32, SUB_CHUNK, Kernels, check_common, declines_common,
    make_linear_attention)

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def _mm(a, b, dims, dtype):
  """Matmul with operands in `dtype`, fp32 accumulation."""
  precision = lax.Precision.HIGHEST if dtype == F32 else None
  return lax.dot_general(a.astype(dtype), b.astype(dtype), dims,
                         precision=precision, preferred_element_type=F32)


def _iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


def _mask(start_Cx1):
  """M[t, s]: key s is visible to query t (start_t <= s <= t)."""
  C = start_Cx1.shape[0]
  t, s = _iota((C, C), 0), _iota((C, C), 1)
  return (s <= t) & (s >= start_Cx1)


def _mask_t(start_1xC):
  """M^T[s, t], from start laid out along lanes."""
  C = start_1xC.shape[1]
  s, t = _iota((C, C), 0), _iota((C, C), 1)
  return (s <= t) & (s >= start_1xC)


def _q_scale(b_CxG, start_Cx1):
  """Q~ = q * this: the decay since the chunk start, for queries that read
  the entering state."""
  return jnp.where(start_Cx1 < 0, jnp.exp(b_CxG), 0.0)


def _k_scale(b_CxG, start_Cx1):
  """K~ = k * this: the decay to the chunk end, for keys whose segment
  reaches it."""
  C = b_CxG.shape[0]
  reaches = _iota((C, 1), 0) >= start_Cx1[C - 1:]
  return jnp.where(reaches, jnp.exp(b_CxG[C - 1:] - b_CxG), 0.0)


def _carry(b_CxG, start_Cx1):
  """gamma [1, G]: how the entering state survives the chunk."""
  C = b_CxG.shape[0]
  return jnp.where(start_Cx1[C - 1:] < 0, jnp.exp(b_CxG[C - 1:]), 0.0)


def _scores(q, k, b, mask, brow):
  """A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk) where mask, fp32 [C, C].
  brow [1, C] is b along lanes for scalar decay; None for per channel."""
  mm = q.dtype
  if brow is not None:
    return _mm(q, k, _NT, mm) * jnp.exp(jnp.where(mask, b - brow, -jnp.inf))
  C, c = q.shape[0], SUB_CHUNK
  qf, kf = q.astype(F32), k.astype(F32)
  row = _iota(kf.shape, 0)
  blocks = [jnp.zeros((c, C), F32)]  # sub-chunk 0 has no earlier keys
  for lo in range(c, C, c):
    r = b[lo - 1:lo]
    q_r = qf[lo:lo + c] * jnp.exp(b[lo:lo + c] - r)
    k_r = kf * jnp.exp(jnp.where(row < lo, r - b, -jnp.inf))
    blocks.append(_mm(q_r, k_r, _NT, mm))
  A = jnp.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
  t, s = _iota((C, C), 0), _iota((C, C), 1)
  in_sub = _iota((C, 1), 0) & (c - 1)

  def band(d, A):  # the pairs (t, t - d) inside one sub-chunk
    k_d, b_d = pltpu.roll(kf, d, 0), pltpu.roll(b, d, 0)
    expo = jnp.where(in_sub >= d, b - b_d, -jnp.inf)
    A_d = jnp.sum(qf * k_d * jnp.exp(expo), axis=1, keepdims=True)
    return A + jnp.where(s == t - d, A_d, 0.0)

  A = lax.fori_loop(0, c, band, A)
  return jnp.where(mask, A, 0.0)


def _apply(W, X, b, causal: bool, mm):
  """Y[u] = sum_w W[u, w] X[w] * exp(b_u - b_w) over w <= u (causal) or
  exp(b_w - b_u) over w >= u; W [C, C] masked, X [C, K], b [C, K], fp32.
  The per-channel dq (W = dA, X = k) and dk (W = dA^T, X = q)."""
  C, c = W.shape[0], SUB_CHUNK
  row = _iota(X.shape, 0)
  blocks = []
  for lo in range(0, C, c):
    hi = lo + c
    if (lo == 0) if causal else (hi == C):
      blocks.append(jnp.zeros((c, X.shape[1]), F32))
      continue
    if causal:  # keys before the sub-chunk, reference just before it
      r = b[lo - 1:lo]
      x_r = X * jnp.exp(jnp.where(row < lo, r - b, -jnp.inf))
      blocks.append(jnp.exp(b[lo:hi] - r) * _mm(W[lo:hi], x_r, _NN, mm))
    else:  # queries after the sub-chunk, reference at its last token
      r = b[hi - 1:hi]
      x_r = X * jnp.exp(jnp.where(row >= hi, b - r, -jnp.inf))
      blocks.append(jnp.exp(r - b[lo:hi]) * _mm(W[lo:hi], x_r, _NN, mm))
  Y = jnp.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
  u, w = _iota((C, C), 0), _iota((C, C), 1)
  in_sub = _iota((C, 1), 0) & (c - 1)

  def band(d, Y):  # the pairs (u, u -+ d) inside one sub-chunk
    shift = d if causal else jnp.where(d == 0, 0, C - d)
    x_d, b_d = pltpu.roll(X, shift, 0), pltpu.roll(b, shift, 0)
    W_d = jnp.sum(jnp.where(w == (u - d if causal else u + d), W, 0.0),
                  axis=1, keepdims=True)
    expo = (jnp.where(in_sub >= d, b - b_d, -jnp.inf) if causal
            else jnp.where(in_sub + d < c, b_d - b, -jnp.inf))
    return Y + W_d * x_d * jnp.exp(expo)

  return lax.fori_loop(0, c, band, Y)


# -- kernels (one grid cell: one batch row, head and chunk) -------------------

def _state_kernel(x_ref, y_ref, b_ref, start_ref, s0_ref, entering_ref,
                  final_ref, *, reverse):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    final_ref[...] = s0_ref[...]

  s = final_ref[...]
  entering_ref[...] = s
  b, start = b_ref[...], start_ref[...]
  scale = _q_scale(b, start) if reverse else _k_scale(b, start)
  x = x_ref[...]
  update = _mm(y_ref[...], x.astype(F32) * scale, _TN, x.dtype)  # [V, K]
  final_ref[...] = s * _carry(b, start) + update


def _forward_kernel(*refs, scalar):
  """refs: q, k, v, b, [b along lanes if scalar], start, S^T entering, o."""
  q_ref, k_ref, v_ref, b_ref, *refs = refs
  row_ref = refs.pop(0) if scalar else None
  start_ref, s_ref, o_ref = refs
  q, k, b, start = q_ref[...], k_ref[...], b_ref[...], start_ref[...]
  A = _scores(q, k, b, _mask(start), row_ref[...] if scalar else None)
  q_tilde = q.astype(F32) * _q_scale(b, start)
  o = _mm(A, v_ref[...], _NN, q.dtype) + _mm(q_tilde, s_ref[...], _NT, q.dtype)
  o_ref[...] = o.astype(o_ref.dtype)


def _backward_kernel(q_ref, k_ref, v_ref, b_ref, row_ref, start_ref, do_ref,
                     s_ref, r_ref, dq_ref, dk_ref, dv_ref, db_ref, *, scalar):
  """row_ref holds b along lanes (scalar decay) or start along lanes."""
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  b, start, St, Rt = b_ref[...], start_ref[...], s_ref[...], r_ref[...]
  mm, C = q.dtype, q.shape[0]
  qf, kf = q.astype(F32), k.astype(F32)
  mask = _mask(start)
  k_scale = _k_scale(b, start)
  dA = jnp.where(mask, _mm(do, v, _NT, mm), 0.0)
  dq = _mm(do, St, _NN, mm) * _q_scale(b, start)
  dk_inter = _mm(v, Rt, _NN, mm) * k_scale
  dv = _mm(kf * k_scale, Rt, _NT, mm)
  if scalar:
    D = jnp.exp(jnp.where(mask, b - row_ref[...], -jnp.inf))
    A = _mm(q, k, _NT, mm) * D
    dq = dq + _mm(dA * D, k, _NN, mm)
    dk = dk_inter + _mm(dA * D, q, _TN, mm)
  else:
    A = _scores(q, k, b, mask, None)
    dq = dq + _apply(dA, kf, b, True, mm)
    dAT = jnp.where(_mask_t(row_ref[...]), _mm(v, do, _NT, mm), 0.0)
    dk = dk_inter + _apply(dAT, qf, b, False, mm)
  dv = dv + _mm(A, do, _TN, mm)
  # d b_t from every exp(+-b_t); the chunk-end decay in K~ and gamma
  # belongs to the last token.
  db = qf * dq - kf * dk
  last = (jnp.sum(kf * dk_inter, axis=0, keepdims=True)
          + _carry(b, start) * jnp.sum(St * Rt, axis=0, keepdims=True))
  if scalar:
    db, last = (jnp.sum(x, axis=1, keepdims=True) for x in (db, last))
  db_ref[...] = db + jnp.where(_iota((C, 1), 0) == C - 1, last, 0.0)
  dq_ref[...], dk_ref[...], dv_ref[...] = dq, dk, dv


# -- pallas_calls ---------------------------------------------------------

def _call(kernel, static, grid_BxHxN, in_specs, out_specs, out_shape,
          sequential: bool):
  C, interpret = static
  semantics = ("parallel", "parallel", "arbitrary" if sequential else "parallel")
  return pl.pallas_call(
      kernel, grid=grid_BxHxN, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def _tokens(C, D, group=1, chunk=lambda n: n):
  """Blocks of C tokens of a [B, H', Lp, D] array; H' = H / group."""
  # lax.div, not //: floor division lowers through sign, which Mosaic only
  # lowers knowing the TPU generation (not so when exporting from a CPU).
  return pl.BlockSpec((None, None, C, D),
                      lambda i, h, n: (i, lax.div(h, group), chunk(n), 0))


def _starts(C, chunk=lambda n: n):
  return pl.BlockSpec((None, C, 1), lambda i, h, n: (i, chunk(n), 0))


def _per_chunk(shape, chunk=lambda n: n):
  """Blocks [*shape] of a [B, H, N, *shape] array."""
  return pl.BlockSpec((None, None, None, *shape),
                      lambda i, h, n: (i, h, chunk(n), 0, 0))


def _along_lanes(x_BxHxLpx1, C):
  """[B, H', Lp, 1] -> [B, H', N, 1, C]: a per-token column per chunk as a row."""
  B, H, Lp, _ = x_BxHxLpx1.shape
  return jnp.swapaxes(x_BxHxLpx1.reshape(B, H, Lp // C, C, 1), -1, -2)


def _state_pass(static, x, y, b, start, s0T, *, reverse):
  C = static[0]
  B, H, Lp, G = b.shape
  N, K, V = Lp // C, x.shape[-1], y.shape[-1]
  chunk = (lambda n: N - 1 - n) if reverse else (lambda n: n)
  whole = pl.BlockSpec((None, None, V, K), lambda i, h, n: (i, h, 0, 0))
  return _call(
      functools.partial(_state_kernel, reverse=reverse), static, (B, H, N),
      [_tokens(C, K, H // x.shape[1], chunk), _tokens(C, V, H // y.shape[1], chunk),
       _tokens(C, G, 1, chunk), _starts(C, chunk), whole],
      [_per_chunk((V, K), chunk), whole],
      [jax.ShapeDtypeStruct((B, H, N, V, K), F32),
       jax.ShapeDtypeStruct((B, H, V, K), F32)],
      sequential=True)(x, y, b, start, s0T)


def _forward(static, q, k, v, b, start, entering):
  C = static[0]
  B, H, Lp, G = b.shape
  K, V, group = q.shape[-1], v.shape[-1], H // k.shape[1]
  specs = [_tokens(C, K), _tokens(C, K, group), _tokens(C, V, group),
           _tokens(C, G)]
  args = [q, k, v, b]
  if G == 1:
    specs.append(_per_chunk((1, C)))
    args.append(_along_lanes(b, C))
  return _call(
      functools.partial(_forward_kernel, scalar=G == 1), static, (B, H, Lp // C),
      specs + [_starts(C), _per_chunk((V, K))],
      _tokens(C, V), jax.ShapeDtypeStruct((B, H, Lp, V), v.dtype),
      sequential=False)(*args, start, entering)


def _backward(static, q, k, v, b, start, do, entering, leaving):
  C = static[0]
  B, H, Lp, G = b.shape
  K, V, group = q.shape[-1], v.shape[-1], H // k.shape[1]
  row = _along_lanes(b if G == 1 else start[:, None], C)
  row_spec = (_per_chunk((1, C)) if G == 1 else pl.BlockSpec(
      (None, None, None, 1, C), lambda i, h, n: (i, 0, n, 0, 0)))
  shapes = [(B, H, Lp, K), (B, H, Lp, K), (B, H, Lp, V), (B, H, Lp, G)]
  return _call(
      functools.partial(_backward_kernel, scalar=G == 1), static, (B, H, Lp // C),
      [_tokens(C, K), _tokens(C, K, group), _tokens(C, V, group), _tokens(C, G),
       row_spec, _starts(C), _tokens(C, V), _per_chunk((V, K)), _per_chunk((V, K))],
      [_tokens(C, K), _tokens(C, K), _tokens(C, V), _tokens(C, G)],
      [jax.ShapeDtypeStruct(s, F32) for s in shapes],
      sequential=False)(q, k, v, b, row, start, do, entering, leaving)


def _check(q, k, v, log_decay, chunk_size):
  check_common(q, k, v, log_decay, "pallas_tpu linear attention")
  if chunk_size < SUB_CHUNK or chunk_size % SUB_CHUNK:
    raise ValueError(f"pallas_tpu linear attention: chunk_size must be a "
                     f"multiple of {SUB_CHUNK}, got {chunk_size}")


linear_attention = make_linear_attention(
    Kernels(_state_pass, _forward, _backward), _check)


def declines(**query) -> str | None:
  """Reads platform, dtype and chunk_size."""
  reason = declines_common(query, "tpu", ("dtype", "chunk_size"), "pallas_tpu")
  if reason:
    return reason
  C = query["chunk_size"]
  if C < SUB_CHUNK or C % SUB_CHUNK:
    return f"chunk_size {C} is not a multiple of {SUB_CHUNK} (the sub-chunk)"
  return None


IMPL = Impl("pallas_tpu", linear_attention, declines)
