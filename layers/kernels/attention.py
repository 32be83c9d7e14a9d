"""Softmax attention kernels.

All take q [B, Lq, H, K], k/v [B, Lk, G, K] with H a multiple of G (grouped
KV heads), a boolean mask broadcastable to [B, H, Lq, Lk] (True = attend),
an optional additive bias of the same shape, and return [B, Lq, H, K].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.kernels import Impl, Op


def reference(q, k, v, mask, bias=None, scale=None):
  """Plain einsum softmax attention, scores and softmax in fp32."""
  B, Lq, H, K = q.shape
  G = k.shape[2]
  scale = K ** -0.5 if scale is None else scale
  qg = q.reshape(B, Lq, G, H // G, K)
  s = jnp.einsum("bqgrk,bsgk->bgrqs", qg, k,
                 preferred_element_type=jnp.float32) * scale
  s = s.reshape(B, H, Lq, -1)
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  s = jnp.where(mask, s, -jnp.inf)
  # Rows with no visible key (only possible with padding) give zeros, not NaN.
  p = jnp.exp(s - jnp.max(jnp.where(mask, s, 0.0), -1, keepdims=True))
  p = jnp.where(mask, p, 0.0)
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  p = p.reshape(B, G, H // G, Lq, -1).astype(v.dtype)
  o = jnp.einsum("bgrqs,bsgk->bqgrk", p, v)
  return o.reshape(B, Lq, H, K)


def _xla(q, k, v, mask, bias=None, scale=None):
  mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                      scale=scale, implementation="xla")


def _cudnn(q, k, v, mask, bias=None, scale=None):
  mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                      scale=scale, implementation="cudnn")


def _cudnn_declines(platform, dtype, head_dim, **_):
  if platform != "gpu":
    return "needs a GPU"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"needs bf16/fp16, got {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > 128:
    return f"needs head_dim a multiple of 8 and <= 128, got {head_dim}"
  return None


ATTENTION = Op(
    "attention",
    impls={
        "cudnn": Impl("cudnn", _cudnn, _cudnn_declines),
        "xla": Impl("xla", _xla),
        "reference": Impl("reference", reference),
    },
    order={"gpu": ("cudnn", "xla", "reference"),
           "default": ("xla", "reference")},
)
