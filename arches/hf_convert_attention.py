"""HuggingFace Llama-family attention (Llama, Mistral, Qwen2, ...) -> our
softmax-attention mixers.

`attention_options(config)` gives the mixer options that reproduce an HF
config's attention (heads, head size, RoPE base, Mistral's sliding window);
`load_attention(proj, hf_attn)` copies q/k/v/o_proj weights into a
`QKVProjection`. Both layouts split heads the same way and rotate the
half-split RoPE pairs, so no permutation is needed. Takes torch modules but
does not import torch.
"""

from __future__ import annotations

import jax.numpy as jnp


def attention_options(config) -> dict:
  """Options for `attention` / `sliding_window` from an HF config. Adds
  `window` when the config has a sliding window (HF attends keys with
  kv_idx > q_idx - sliding_window: the same `window` semantics as ours),
  and the RoPE `fraction` when only part of each head rotates
  (partial_rotary_factor: in rope_parameters in transformers 5.x, on the
  config in 4.x)."""
  rope = getattr(config, "rope_parameters", None)
  if rope is None:  # transformers 4.x keeps the base and scaling apart
    rope = {**(getattr(config, "rope_scaling", None) or {}),
            "rope_theta": getattr(config, "rope_theta", 10000.0)}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise ValueError(f"only default (unscaled) RoPE converts, got {kind!r}")
  fraction = rope.get("partial_rotary_factor",
                      getattr(config, "partial_rotary_factor", None) or 1.0)
  heads = config.num_attention_heads
  options = {
      "num_heads": heads,
      "num_kv_heads": config.num_key_value_heads,
      "head_dim": (getattr(config, "head_dim", None)
                   or config.hidden_size // heads),
      "position": {"name": "rope", "base": float(rope.get("rope_theta", 10000.0)),
                   "fraction": float(fraction)},
  }
  if getattr(config, "sliding_window", None):
    options["window"] = int(config.sliding_window)
  return options


def _array(t):
  return jnp.asarray(t.detach().float().cpu().numpy())


def _load_dense(dense, linear, in_shape, out_shape, who):
  """torch Linear weight [out, in] -> our kernel [*in_shape, *out_shape]."""
  w = _array(linear.weight).T.reshape(*in_shape, *out_shape)
  if w.shape != dense.kernel[...].shape:
    raise ValueError(f"{who}: HF weight {tuple(linear.weight.shape)} does not "
                     f"fit kernel {dense.kernel[...].shape}")
  dense.kernel[...] = w
  has_bias = getattr(linear, "bias", None) is not None
  if has_bias != (dense.bias is not None):
    raise ValueError(f"{who}: HF bias {'present' if has_bias else 'absent'} "
                     f"but ours {'present' if dense.bias is not None else 'absent'}; "
                     "set use_bias accordingly")
  if has_bias:
    dense.bias[...] = _array(linear.bias).reshape(out_shape)


def load_attention(proj, hf_attn) -> None:
  """Copy an HF attention module's q/k/v/o_proj into `proj` (QKVProjection)."""
  d_model = proj.q.kernel[...].shape[0]
  heads, head_dim = proj.q.kernel[...].shape[1:]
  kv_heads = proj.k.kernel[...].shape[1]
  _load_dense(proj.q, hf_attn.q_proj, (d_model,), (heads, head_dim), "q_proj")
  _load_dense(proj.k, hf_attn.k_proj, (d_model,), (kv_heads, head_dim), "k_proj")
  _load_dense(proj.v, hf_attn.v_proj, (d_model,), (kv_heads, head_dim), "v_proj")
  _load_dense(proj.o, hf_attn.o_proj, (heads, head_dim), (d_model,), "o_proj")
