"""What the Pallas flash-attention kernels share: the op's signature turned
into padded heads-first arrays, the custom VJP that ties a backend's
forward and backward kernels together, and the rules for declining.

The kernels implement `layers.kernels.attention`'s op (signature and
semantics in `layers.kernels.attention_call`) with FlashAttention-2's
algorithm, as the pure-JAX `layers.kernels.flash` does and with its block
bounds (`flash.Plan`): a query block visits only the key blocks it can see
(causal diagonal, sliding window), the online softmax and every
accumulator are fp32, and the backward recomputes each score block from
q, k and the saved log-sum-exp. What the kernels read:

  q [B, H, Tp, K], k, v [B, G, Sp, K]: heads first, the caller's dtype,
      T and S zero-padded to Tp = nq * bq and Sp = nk * bk (padded keys
      are masked by position; padded queries are sliced off, and their
      output gradient is 0, so they add nothing to dk, dv).
  segs: None, or (q_seg [B, Tp, 1], kv_seg [B, 1, Sp]) int32 (the
      padding repeats the last id).
  lse, delta [B, H, Tp, 1] fp32: the log-sum-exp of each query's scores
      (+inf for a query that sees no key, so its recomputed probabilities
      are 0) and rowsum(dO * O).

Not in the kernels: ALiBi (`alibi_slopes`) and a traced `q_offset` (the
block bounds are static); `declines` says so and the op's other forms
take those calls.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from layers.kernels import attention_call
from layers.kernels.flash import Plan

F32 = jnp.float32
DTYPES = ("float32", "bfloat16")


class Kernels(NamedTuple):
  """One backend's kernels; `static` is (plan, q_offset, interpret).

  forward(static, q, k, v, segs) -> (o [B, H, Tp, K] in q's dtype,
      lse [B, H, Tp, 1] fp32).
  backward(static, q, k, v, segs, do, lse, delta) -> (dq [B, H, Tp, K],
      dk, dv [B, H, Sp, K] per query head), fp32.
  """
  forward: Callable
  backward: Callable


def _core(kernels: Kernels):

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def core(static, q, k, v, segs):
    return kernels.forward(static, q, k, v, segs)[0]

  def fwd(static, q, k, v, segs):
    o, lse = kernels.forward(static, q, k, v, segs)
    return o, (q, k, v, segs, o, lse)

  def bwd(static, res, do):
    q, k, v, segs, o, lse = res
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1, keepdims=True)
    dq, dk, dv = kernels.backward(static, q, k, v, segs, do.astype(q.dtype),
                                  lse, delta)
    B, H, Sp, K = dk.shape
    G = k.shape[1]
    group = lambda d: d.reshape(B, G, H // G, Sp, K).sum(2)
    return (dq.astype(q.dtype), group(dk).astype(k.dtype),
            group(dv).astype(v.dtype), None)

  core.defvjp(fwd, bwd)
  return core


def unsupported(*, dtype, alibi, q_offset, **_) -> str | None:
  """What no Pallas flash kernel takes, from a call's facts, or None."""
  if jnp.dtype(dtype).name not in DTYPES:
    return f"dtype {jnp.dtype(dtype).name} (the kernel takes {' or '.join(DTYPES)})"
  if alibi:
    return "no ALiBi bias in the kernel"
  if q_offset is None:
    return "a traced q_offset (decoding from a cache): the block bounds are static"
  return None


def make_attention(kernels: Kernels, blocks: Callable[[int, int], tuple],
                   who: str, cannot_run: Callable[..., str | None]):
  """The op's fn(q, k, v, **call, block_q=None, block_k=None,
  interpret=False) on `kernels`; `blocks(T, S)` gives the default
  (block_q, block_k); `cannot_run(**facts)` says why the kernels cannot
  run a call (`attention_call.facts`), or None."""
  core = _core(kernels)

  @attention_call.checked
  def attention(q, k, v, *, causal=True, q_offset=0, window=None,
                q_segment_ids=None, kv_segment_ids=None, alibi_slopes=None,
                softcap=None, scale=None, block_q=None, block_k=None,
                interpret=False):
    facts = attention_call.facts(
        q, k, causal=causal, q_offset=q_offset, window=window,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        alibi_slopes=alibi_slopes, softcap=softcap, scale=scale)
    reason = cannot_run(**facts)
    if reason:
      raise ValueError(f"{who} attention cannot run this call: {reason}")
    B, T, H, K = q.shape
    S = k.shape[1]
    bq, bk = blocks(T, S)
    plan = Plan(causal=causal, window=window, softcap=softcap,
                scale=K ** -0.5 if scale is None else scale, T=T, S=S,
                bq=block_q or bq, bk=block_k or bk)
    Tp, Sp = plan.nq * plan.bq, plan.nk * plan.bk

    def heads(x, n):
      return jnp.swapaxes(jnp.pad(x, [(0, 0), (0, n - x.shape[1]), (0, 0),
                                      (0, 0)]), 1, 2)

    segs = None
    if q_segment_ids is not None:
      pad = lambda s, n: jnp.pad(s.astype(jnp.int32), [(0, 0), (0, n - s.shape[1])],
                                 mode="edge")
      segs = (pad(q_segment_ids, Tp)[:, :, None], pad(kv_segment_ids, Sp)[:, None])
    o = core((plan, int(q_offset), interpret), heads(q, Tp), heads(k, Sp),
             heads(v, Sp), segs)
    return jnp.swapaxes(o, 1, 2)[:, :T]

  return attention


def declines_flash(query: dict, platform: str, who: str,
                   cannot_run: Callable[..., str | None]) -> str | None:
  """The platform, that the caller stated the facts, then `cannot_run`."""
  if query.get("platform") != platform:
    return f"{who} runs on {platform}, not {query.get('platform')}"
  missing = [k for k in ("dtype", "head_dim", "alibi", "q_offset") if k not in query]
  if missing:
    return f"the caller did not state {', '.join(missing)}"
  return cannot_run(**{k: v for k, v in query.items() if k != "platform"})


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m
