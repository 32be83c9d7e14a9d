"""What a softmax-attention call may ask for: the argument checks every
implementation of `layers.kernels.attention.ATTENTION` runs, and the static
facts of a call that an implementation's `declines` reads.

The signature every implementation takes:

  attention(q, k, v, *, causal=True, q_offset=0, window=None,
            q_segment_ids=None, kv_segment_ids=None, alibi_slopes=None,
            softcap=None, scale=None) -> o

  q [B, T, H, K]; k, v [B, S, G, K], H a multiple of G (GQA; MQA at G=1);
  o [B, T, H, K] in q's dtype, scores and softmax statistics in fp32.
  Query i sits at position q_offset + i (a Python int, or a traced int32
  scalar when decoding from a KV cache), key j at position j.
  causal: key j visible to query i only if j <= q_offset + i.
  window: also j > q_offset + i - window (`window` keys including itself).
  q_segment_ids [B, T], kv_segment_ids [B, S] (both or neither): visible
  only within the same segment (packed rows).
  alibi_slopes [H]: adds -slope_h * (q_pos - k_pos) to the scaled score.
  softcap: the scaled score s becomes softcap * tanh(s / softcap), before
  the bias and the mask (Gemma 2).
  scale: default K ** -0.5.
  A query that sees no key returns 0, with gradient 0.
"""

from __future__ import annotations

import functools

import numpy as np


def checked(impl):
  """Wrap an implementation so that every call is `check`ed first."""
  @functools.wraps(impl)
  def run(q, k, v, **call):
    check(q, k, v, **call)
    return impl(q, k, v, **call)
  return run


def check(q, k, v, *, causal=True, q_offset=0, window=None, q_segment_ids=None,
          kv_segment_ids=None, alibi_slopes=None, softcap=None, scale=None,
          **impl_options):
  """Raise ValueError naming the argument, its value and what is allowed.
  `impl_options` (e.g. block sizes) are the implementation's to check."""
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"attention takes q [B, T, H, K] and k, v [B, S, G, K]; "
                     f"got q {q.shape}, k {k.shape}, v {v.shape}")
  B, T, H, K = q.shape
  if k.shape[0] != B or k.shape[3] != K or H % k.shape[2]:
    raise ValueError(f"attention: k/v {k.shape} must share q's batch and head "
                     f"dim and have a number of heads dividing q's; q {q.shape}")
  if np.shape(q_offset) != ():
    raise ValueError(f"attention: q_offset must be a scalar, got shape "
                     f"{np.shape(q_offset)}")
  if is_static(q_offset) and q_offset < 0:
    raise ValueError(f"attention: q_offset must be >= 0, got {q_offset}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("attention: pass both q_segment_ids and kv_segment_ids "
                     "or neither")
  if q_segment_ids is not None and (q_segment_ids.shape != (B, T)
                                    or kv_segment_ids.shape != (B, k.shape[1])):
    raise ValueError(f"attention: segment ids must be q [B, T] = {(B, T)} and "
                     f"kv [B, S] = {(B, k.shape[1])}; got "
                     f"{q_segment_ids.shape} and {kv_segment_ids.shape}")
  if window is not None and not (isinstance(window, int) and window >= 1):
    raise ValueError(f"attention: window must be None or an int >= 1, got "
                     f"{window!r}")
  if alibi_slopes is not None and alibi_slopes.shape != (H,):
    raise ValueError(f"attention: alibi_slopes must be [H] = [{H}], got "
                     f"{alibi_slopes.shape}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"attention: softcap must be None or > 0, got {softcap!r}")
  if scale is not None and not scale > 0:
    raise ValueError(f"attention: scale must be None or > 0, got {scale!r}")


def is_static(q_offset) -> bool:
  return isinstance(q_offset, (int, np.integer))


def facts(q, k, *, causal=True, q_offset=0, window=None, q_segment_ids=None,
          kv_segment_ids=None, alibi_slopes=None, softcap=None,
          scale=None) -> dict:
  """The static facts of a call, the query `ATTENTION.choose` passes to each
  implementation's `declines` (besides `platform`): dtype, head_dim, q_len,
  kv_len, causal, q_offset (the int, or None when traced), window,
  segments / alibi / softcap (whether given)."""
  return dict(dtype=q.dtype, head_dim=q.shape[3], q_len=q.shape[1],
              kv_len=k.shape[1], causal=causal,
              q_offset=int(q_offset) if is_static(q_offset) else None,
              window=window, segments=q_segment_ids is not None,
              alibi=alibi_slopes is not None, softcap=softcap is not None)
