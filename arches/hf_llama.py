"""Import HuggingFace Llama / Mistral-style decoder weights into DecoderLM.

    cfg, params = from_hf(hf_config, hf_state_dict)   # see arches.convert

Works from a state dict of torch tensors or numpy arrays (a checkpoint
loaded with safetensors or `model.state_dict()`), so the same code serves
tests with random weights and real checkpoints. The RoPE layout (half
split) and the SwiGLU MLP match ours, so no permutation is needed.
"""

from __future__ import annotations

from typing import Any, Mapping

from arches.convert import Tensors, attention, lm_params, norm, swiglu
from arches.lm import LMConfig

# HuggingFace rope_type -> (our position scheme, option renames).
ROPE_TYPES = {
    "default": ("rope", {}),
    "linear": ("rope_linear", {"factor": "factor"}),
    "yarn": ("yarn", {"factor": "factor", "beta_fast": "beta_fast",
                      "beta_slow": "beta_slow",
                      "original_max_position_embeddings": "original_max_len"}),
    "llama3": ("rope_llama3", {"factor": "factor", "low_freq_factor": "low_freq_factor",
                               "high_freq_factor": "high_freq_factor",
                               "original_max_position_embeddings": "original_max_len"}),
}


def rope_spec(config: Any) -> dict:
  """Our position spec from an HF config's RoPE settings, including a
  partial_rotary_factor (only part of each head rotates) as `fraction`."""
  params = dict(getattr(config, "rope_parameters", None) or {})
  if not params:  # transformers < 5 kept these on the config
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: "
                     f"{sorted(ROPE_TYPES)}")
  name, renames = ROPE_TYPES[rope_type]
  spec = {"name": name, "base": float(params.get("rope_theta", 10000.0))}
  for hf_key, ours in renames.items():
    if params.get(hf_key) is not None:
      spec[ours] = params[hf_key]
  if "original_max_len" in spec:
    spec["original_max_len"] = int(spec["original_max_len"])
  if spec.get("factor") is not None:
    spec["factor"] = float(spec["factor"])
  fraction = params.get("partial_rotary_factor",
                        getattr(config, "partial_rotary_factor", None) or 1.0)
  if fraction != 1.0:
    if name != "rope":
      raise ValueError(f"partial_rotary_factor {fraction} is supported with "
                       f"default RoPE only, got rope_type {rope_type!r}")
    spec["fraction"] = float(fraction)
  return spec


def heads(config) -> tuple[int, int, int]:
  """(query heads, key/value heads, head_dim) of a Llama-family config."""
  n = config.num_attention_heads
  return (n, getattr(config, "num_key_value_heads", None) or n,
          getattr(config, "head_dim", None) or config.hidden_size // n)


def config_from_hf(config: Any) -> LMConfig:
  """The mixer follows the config: "sliding_window" with HF's window when
  `config.sliding_window` is set (Mistral; HF's window counts the query
  itself, as ours does), else dense "attention"."""
  if getattr(config, "mlp_bias", False):
    raise ValueError("mlp_bias=True is not supported: our SwiGLU has no biases")
  n, kv, head_dim = heads(config)
  mixer = {"name": "attention", "num_heads": n, "num_kv_heads": kv,
           "head_dim": head_dim, "position": rope_spec(config)}
  if getattr(config, "sliding_window", None) is not None:
    mixer.update(name="sliding_window", window=int(config.sliding_window))
  if getattr(config, "attention_bias", False):  # biases on q, k, v and o
    mixer.update(use_bias=True, out_bias=True)
  return LMConfig(
      vocab_size=config.vocab_size, d_model=config.hidden_size,
      n_layers=config.num_hidden_layers, mixer=mixer,
      channel={"name": "swiglu", "hidden": config.intermediate_size},
      norm="rmsnorm", norm_eps=config.rms_norm_eps,
      tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def blocks_from_hf(config: Any, sd: Tensors, channel=None) -> dict:
  """Our blocks from Llama-layout layers; `channel(sd, prefix, layer)`
  converts each layer's `mlp.` (a SwiGLU unless given: MoE models pass
  theirs)."""
  channel = channel or (lambda sd, prefix, _: swiglu(sd, prefix))
  return {i: {"mixer_norm": norm(sd, f"layers.{i}.input_layernorm"),
              "mixer": attention(sd, f"layers.{i}.self_attn.", *heads(config)),
              "channel_norm": norm(sd, f"layers.{i}.post_attention_layernorm"),
              "channel": channel(sd, f"layers.{i}.mlp.", i)}
          for i in range(config.num_hidden_layers)}


def from_hf(config: Any, state_dict: Mapping[str, Any]) -> tuple[LMConfig, dict]:
  """(LMConfig, params) of a HuggingFace Llama-family (Llama, Mistral) model."""
  cfg = config_from_hf(config)
  sd = Tensors(state_dict, strip="model.")
  return cfg, lm_params(sd, cfg, blocks_from_hf(config, sd), embed="embed_tokens",
                        final_norm="norm")
