"""Softmax attention: the op table and the einsum oracle.

Every implementation of ATTENTION takes the signature and semantics in
`layers.kernels.attention_call` (q [B, T, H, K], k/v [B, S, G, K]; causal,
q_offset, window, segment ids, ALiBi slopes, softcap, scale as keyword
options) and never receives a mask array:

  * "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, told
    the call's causality, window and lengths; declines what those cannot
    express.
  * "blockwise": `layers.kernels.flash`, FlashAttention's algorithm in pure
    JAX; O(L d) memory, causal and window block skipping; takes every call.
  * "reference": the plain einsum over the whole [T, S] score matrix, the
    oracle; used only when forced.
  * "pallas_tpu", "pallas_gpu": `layers.kernels.pallas.flash_tpu` /
    `flash_gpu`, the flash kernels in Pallas for TPU and Mosaic GPU (no
    ALiBi, a static q_offset).

Order: TPU the Pallas kernel, then blockwise; GPU cuDNN, then the Pallas
kernel (for what cuDNN cannot express without a mask: segments, the
soft-cap; first only once a GPU measures it against cuDNN), then
blockwise; CPU blockwise.

`attend` chooses an implementation for a call (logged once) and runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.kernels import Impl, Op, attention_call, flash
from layers.kernels.pallas import flash_gpu, flash_tpu


@attention_call.checked
def reference(q, k, v, *, causal=True, q_offset=0, window=None,
              q_segment_ids=None, kv_segment_ids=None, alibi_slopes=None,
              softcap=None, scale=None):
  """Plain einsum softmax attention with its [B, T, S] visibility mask built
  in full; scores and softmax in fp32. O(T S) memory: the oracle."""
  B, T, H, K = q.shape
  S, G = k.shape[1], k.shape[2]
  scale = K ** -0.5 if scale is None else scale
  q_pos = q_offset + jnp.arange(T)[:, None]
  k_pos = jnp.arange(S)[None, :]
  visible = jnp.ones((1, T, S), bool)
  if causal:
    visible = visible & (k_pos <= q_pos)
  if window is not None:
    visible = visible & (k_pos > q_pos - window)
  if q_segment_ids is not None:
    visible = visible & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  visible = visible[:, None, None]  # [B|1, 1, 1, T, S]
  s = jnp.einsum("btgrk,bsgk->bgrts", q.reshape(B, T, G, H // G, K), k,
                 preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  if alibi_slopes is not None:
    slopes = alibi_slopes.astype(jnp.float32).reshape(G, H // G, 1, 1)
    s = s - slopes * (q_pos - k_pos).astype(jnp.float32)
  s = jnp.where(visible, s, -jnp.inf)
  m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
  p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m))  # rows seeing no key: 0
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  o = jnp.einsum("bgrts,bsgk->btgrk", p.astype(v.dtype), v)
  return o.reshape(B, T, H, K).astype(q.dtype)


def _cudnn_cannot_express(*, dtype, head_dim, q_len, kv_len, causal, q_offset,
                          window, segments, alibi, softcap, **_):
  """Why `jax.nn.dot_product_attention`'s cuDNN path cannot run this call
  without a mask or bias array, or None."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"needs bf16/fp16, got {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > 128:
    return f"needs head_dim a multiple of 8 and <= 128, got {head_dim}"
  if segments:
    return "segment ids (packed rows) would need a mask array"
  if alibi:
    return "ALiBi would need a bias array"
  if softcap:
    return "no logit soft-cap"
  if q_len == 1 and window is None:
    return None  # decoding one token: causality is a key length
  if q_offset != 0:
    return (f"q_offset {'traced' if q_offset is None else q_offset} with "
            f"{q_len} queries: cuDNN aligns queries at key 0")
  if causal and q_len != kv_len:
    return f"causal needs q_len == kv_len, got {q_len} and {kv_len}"
  if window is not None and not causal:
    return "a window without causality is unbounded on the right"
  return None


def _cudnn_declines(*, platform, **facts):
  if platform != "gpu":
    return "needs a GPU"
  return _cudnn_cannot_express(**facts)


@attention_call.checked
def _cudnn(q, k, v, **call):
  """cuDNN's fused attention, told causality, window and key lengths; takes
  the options of `layers.kernels.attention_call`."""
  facts = attention_call.facts(q, k, **call)
  reason = _cudnn_cannot_express(**facts)
  if reason:
    raise ValueError(f"attention kernel 'cudnn' cannot run this call: {reason}")
  causal, window, kv_lengths = facts["causal"], facts["window"], None
  if q.shape[1] == 1 and causal:
    # One query at q_offset sees keys 0..q_offset: a key length, no mask.
    seen = jnp.asarray(call.get("q_offset", 0), jnp.int32) + 1
    kv_lengths = jnp.full((q.shape[0],), jnp.minimum(seen, k.shape[1]), jnp.int32)
    causal = False
  return jax.nn.dot_product_attention(
      q, k, v, scale=call.get("scale"), is_causal=causal,
      key_value_seq_lengths=kv_lengths,
      local_window_size=None if window is None else (window - 1, 0),
      implementation="cudnn")


ATTENTION = Op(
    "attention",
    impls={
        "cudnn": Impl("cudnn", _cudnn, _cudnn_declines),
        "blockwise": Impl("blockwise", flash.attention),
        "reference": Impl("reference", reference),
        "pallas_tpu": flash_tpu.IMPL,
        "pallas_gpu": flash_gpu.IMPL,
    },
    order={"tpu": ("pallas_tpu", "blockwise"),
           "gpu": ("cudnn", "pallas_gpu", "blockwise"),
           "default": ("blockwise",)},
)


def attend(q, k, v, *, kernel: str = "auto", **call):
  """Attention by the implementation `kernel` names ("auto": the first in
  the platform's order that accepts the call's facts)."""
  impl = ATTENTION.choose(kernel, **attention_call.facts(q, k, **call))
  return impl.fn(q, k, v, **call)
