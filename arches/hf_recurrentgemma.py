"""HuggingFace transformers RecurrentGemma (Griffin) -> (LMConfig, params).

    cfg, params = from_hf(hf_config, state_dict)   # see arches.convert

Layers follow HF's block_types cycled over depth, as transformers cycles
them. Recurrent layers become `rglru` mixers; attention layers become
`sliding_window`: local multi-query attention (num_key_value_heads, 1 in
the released models) with partial RoPE (the first partial_rotary_factor =
0.5 of each head rotates, frequencies over the rotated dims), no q/k/v bias
unless attention_bias, a biased output projection, and scores scaled by
head_dim^-0.5.

Window: transformers 5.x lets query t see keys t-W+1..t, W =
attention_window_size keys including itself, which is our `window`. (The
original google-deepmind/recurrentgemma code masks with t - s <= W, one key
more; we follow transformers, the reference we test against.)

The MLP is a `swiglu` with activation="gelu_tanh" and biases (hidden =
intermediate_size // 2, as transformers splits it), RMSNorm weights w
become our scale 1 + w (Gemma normalizes with x * (1 + w)), the embedding
scale is transformers' bf16-rounded sqrt(hidden_size), logits are
soft-capped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from arches.convert import Tensors, attention, conv, linear, lm_params, norm, swiglu
from arches.hf_llama import rope_spec
from arches.lm import LMConfig

GELU_TANH = "gelu_pytorch_tanh"


def mixer_specs(c) -> dict:
  """Our mixer spec for each of HF's block types."""
  return {
      "recurrent": {"name": "rglru", "width": c.lru_width,
                    "num_heads": c.num_attention_heads,
                    "conv_width": c.conv1d_width},
      "attention": {"name": "sliding_window", "window": c.attention_window_size,
                    "num_heads": c.num_attention_heads,
                    "num_kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
                    "position": rope_spec(c), "use_bias": c.attention_bias,
                    "out_bias": True},
  }


def embed_scale(hidden_size: int) -> float:
  """transformers keeps sqrt(hidden_size) as a bf16 buffer and multiplies
  by that rounded value; the same number."""
  return float(jnp.asarray(hidden_size ** 0.5, jnp.bfloat16))


def config_from_hf(hf_config) -> LMConfig:
  c = hf_config
  if c.hidden_activation != GELU_TANH:
    raise ValueError(f"hidden_activation {c.hidden_activation!r} is not "
                     f"supported; RecurrentGemma uses {GELU_TANH!r}")
  specs = mixer_specs(c)
  unknown = sorted(set(c.block_types) - set(specs))
  if unknown:
    raise ValueError(f"block_types {c.block_types}: unknown {unknown}; "
                     f"RecurrentGemma blocks are {sorted(specs)}")
  return LMConfig(
      vocab_size=c.vocab_size, d_model=c.hidden_size,
      n_layers=c.num_hidden_layers, mixer=[specs[t] for t in c.block_types],
      channel={"name": "swiglu", "hidden": c.intermediate_size // 2,
               "activation": "gelu_tanh", "use_bias": True},
      norm="rmsnorm", norm_eps=c.rms_norm_eps,
      tie_embeddings=c.tie_word_embeddings, embed_scale=embed_scale(c.hidden_size),
      logit_softcap=c.logits_soft_cap)


def _recurrent(sd, p, c):
  lru = f"{p}.rg_lru"
  gate = lambda g: {"w": sd[f"{lru}.{g}_gate_weight"], "b": sd[f"{lru}.{g}_gate_bias"]}
  return {"gate_proj": linear(sd, f"{p}.linear_y"),
          "in_proj": linear(sd, f"{p}.linear_x"),
          "out_proj": linear(sd, f"{p}.linear_out"),
          "conv": conv(sd, f"{p}.conv_1d"),
          "input_gate": gate("input"), "a_gate": gate("recurrent"),
          "a_param": sd[f"{lru}.recurrent_param"]}


def _attention(sd, p, c):
  return attention(sd, f"{p}.", c.num_attention_heads, c.num_key_value_heads, c.head_dim)


BLOCKS = {"recurrent": _recurrent, "attention": _attention}


def from_hf(config: Any, state_dict: Mapping[str, Any]) -> tuple[LMConfig, dict]:
  """(LMConfig, params) of a RecurrentGemmaForCausalLM from its config and
  state dict."""
  cfg = config_from_hf(config)
  sd = Tensors(state_dict, strip="model.")
  blocks = {}
  for i in range(config.num_hidden_layers):
    p = f"layers.{i}"
    kind = config.block_types[i % len(config.block_types)]
    blocks[i] = {
        "mixer_norm": norm(sd, f"{p}.temporal_pre_norm", offset=1.0),
        "channel_norm": norm(sd, f"{p}.channel_pre_norm", offset=1.0),
        "mixer": BLOCKS[kind](sd, f"{p}.temporal_block", config),
        "channel": swiglu(sd, f"{p}.mlp_block."),
    }
  return cfg, lm_params(sd, cfg, blocks, embed="embed_tokens", final_norm="final_norm",
                        norm_offset=1.0)
