"""What the TPU and GPU chunked linear-attention kernels share.

The kernels implement `layers.kernels.linear_attention`'s op (same
signature, same math: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,
o_t = S_t^T q_t) split as flash-linear-attention does:

  state pass   sequential over chunks, the fp32 state on chip; emits the
               state entering every chunk and the final state. Run
               backwards over the chunks (queries and output gradients in
               place of keys and values) it is also the backward pass of
               the state: dS_n = diag(gamma_n) dS_{n+1} + Q~_n^T dO_n.
  output pass  parallel over chunks: o = (A * M) v + Q~ S_n, with A the
               decayed intra-chunk scores and M the causal, same-segment
               mask.
  output-gradient pass  parallel over chunks: dq, dk, dv and the gradient
               of the within-chunk cumulative log decay.

This module turns the op's [B, L, H, *] arguments into what the kernels
read, ties a backend's three kernels into one function with a custom VJP,
and maps the results back. What the kernels read:

  q [B, H, Lp, K], k [B, Hk, Lp, K], v [B, Hk, Lp, V]: heads first, the
      caller's dtype, L zero-padded to Lp = N * C (C = chunk_size). Hk may
      divide H (grouped key/value heads are read per group, not repeated).
  b [B, H, Lp, G] fp32: the log decay summed within each chunk (the sum
      restarts at every chunk, so b <= 0 and every exponent a kernel takes,
      b_t - b_s with s <= t in one segment, is <= 0). Its gradient flows
      back to log_decay through XLA's cumsum, outside the kernels.
  start [B, Lp, 1] int32: the position in the chunk where the token's
      segment begins, or -1 where the token's segment is the one the state
      entering the chunk belongs to. It encodes every mask: s is visible to
      t iff start_t <= s <= t; a query reads the entering state iff
      start_t < 0; a key reaches the next chunk iff s >= start_{C-1}; the
      state is carried through the chunk iff start_{C-1} < 0. Segment ids
      label contiguous runs, as packing makes them (the op's other forms
      assume the same).
  states travel transposed, [V, K] per head, so that a per-key decay
      scales lanes (TPU) or columns (GPU); the carried state is fp32.

Padding tokens have k = v = 0 and g = 0, so they leave the state as it is.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
SUB_CHUNK = 16  # per-channel decay: exact pairwise products only within 16 tokens
DTYPES = ("float32", "bfloat16")


class Kernels(NamedTuple):
  """One backend's kernels; `static` is (chunk_size, interpret).

  state_pass(static, x, y, b, start, s0T, *, reverse) ->
      (entering [B, H, N, V, K], final [B, H, V, K] fp32), transposed; the
      entering states in fp32 or in the matmul operand dtype (the backend's
      choice: they are only read as matmul operands and for d gamma).
      Forward: x = k, y = v, chunks in order. reverse=True: x = q, y = dO,
      chunks last to first, "entering" being the gradient of the state
      leaving each chunk.
  forward(static, q, k, v, b, start, entering) -> o [B, H, Lp, V] (v's dtype).
  backward(static, q, k, v, b, start, do, entering, leaving) ->
      (dq, dk, dv, db) per query head, fp32.
  """
  state_pass: Callable
  forward: Callable
  backward: Callable


def segment_starts(segment_ids_BxL, chunk: int, padded_len: int):
  """`start` for every token, [B, padded_len] int32 (module docstring)."""
  B, L = segment_ids_BxL.shape
  seg = jnp.pad(segment_ids_BxL, [(0, 0), (0, padded_len - L)], mode="edge")
  seg = seg.reshape(B, -1, chunk)
  # The state entering chunk 0 belongs to the first token's segment.
  entering = jnp.concatenate([seg[:, :1, :1], seg[:, :-1, -1:]], axis=1)
  before = jnp.concatenate([entering, seg[:, :, :-1]], axis=2)
  pos = jnp.where(seg != before, jnp.arange(chunk, dtype=jnp.int32), -1)
  return lax.cummax(pos, axis=2).reshape(B, padded_len)


def _group_sum(d_BxHxLxD, kv_heads: int):
  """Per-query-head gradients summed over each key/value head's group."""
  B, H, L, D = d_BxHxLxD.shape
  return d_BxHxLxD.reshape(B, kv_heads, H // kv_heads, L, D).sum(2)


def _core(kernels: Kernels):
  """The kernels as one function of heads-first arrays with a custom VJP."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def core(static, q, k, v, b, start, s0T):
    return fwd(static, q, k, v, b, start, s0T)[0]

  def fwd(static, q, k, v, b, start, s0T):
    entering, finalT = kernels.state_pass(static, k, v, b, start, s0T,
                                          reverse=False)
    o = kernels.forward(static, q, k, v, b, start, entering)
    return (o, finalT), (q, k, v, b, start, entering)

  def bwd(static, res, cotangents):
    q, k, v, b, start, entering = res
    do, dfinalT = cotangents
    leaving, ds0T = kernels.state_pass(static, q, do.astype(v.dtype), b,
                                       start, dfinalT, reverse=True)
    dq, dk, dv, db = kernels.backward(static, q, k, v, b, start,
                                      do.astype(v.dtype), entering, leaving)
    Hk = k.shape[1]
    return (dq.astype(q.dtype), _group_sum(dk, Hk).astype(k.dtype),
            _group_sum(dv, Hk).astype(v.dtype), db, None, ds0T)

  core.defvjp(fwd, bwd)
  return core


def make_linear_attention(kernels: Kernels, check: Callable[..., None]):
  """The op's fn(q, k, v, log_decay, segment_ids, state, *, chunk_size,
  interpret=False) on `kernels`; `check(q, k, v, log_decay, chunk_size)`
  raises a ValueError for a call the kernels cannot run."""
  core = _core(kernels)

  def linear_attention(q, k, v, log_decay, segment_ids, state, *,
                       chunk_size: int, interpret=False):
    check(q, k, v, log_decay, chunk_size)
    B, L, H, _ = q.shape
    N = -(-L // chunk_size)
    Lp = N * chunk_size
    heads = lambda x: jnp.swapaxes(
        jnp.pad(x, [(0, 0), (0, Lp - L), (0, 0), (0, 0)]), 1, 2)
    g = heads(log_decay.astype(F32))
    b = jnp.cumsum(g.reshape(B, H, N, chunk_size, -1), axis=3)
    start = segment_starts(segment_ids, chunk_size, Lp)[..., None]
    o, finalT = core((chunk_size, interpret), heads(q), heads(k), heads(v),
                     b.reshape(B, H, Lp, -1), start,
                     jnp.swapaxes(state.astype(F32), -1, -2))
    return jnp.swapaxes(o, 1, 2)[:, :L], jnp.swapaxes(finalT, -1, -2)

  return linear_attention


def check_common(q, k, v, log_decay, who: str, dtypes=DTYPES) -> None:
  """Shape and dtype rules every backend shares (a ValueError names them)."""
  B, L, H, K = q.shape
  if k.shape[:2] != (B, L) or k.shape[3] != K or H % k.shape[2]:
    raise ValueError(f"{who}: k has shape {k.shape}; it must be [B, L, Hk, K] "
                     f"with Hk dividing H, for q of shape {q.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"{who}: v has shape {v.shape}; it must be [B, L, Hk, V] "
                     f"like k {k.shape}")
  if log_decay.shape[:3] != (B, L, H) or log_decay.shape[3] not in (1, K):
    raise ValueError(f"{who}: log_decay has shape {log_decay.shape}; it must "
                     f"be [B, L, H, 1] or [B, L, H, {K}]")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype.name not in dtypes:
    raise ValueError(f"{who}: q, k, v must share one dtype of {dtypes}, got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")


def declines_common(query: dict, platform: str, needs: tuple[str, ...],
                    who: str, dtypes=DTYPES) -> str | None:
  """Platform, dtype and which query keys the backend needs stated."""
  if query.get("platform") != platform:
    return f"{who} runs on {platform}, not {query.get('platform')}"
  missing = [key for key in needs if key not in query]
  if missing:
    return f"the caller did not state {', '.join(missing)}"
  dtype = jnp.dtype(query["dtype"]).name
  if dtype not in dtypes:
    return f"dtype {dtype} (the kernel takes {' or '.join(dtypes)})"
  return None
