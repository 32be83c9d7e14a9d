"""Import HuggingFace Llama / Mistral-style decoder weights into DecoderLM.

    model = from_hf_llama(hf_config, hf_state_dict)

Works from a state dict of torch tensors or numpy arrays (a checkpoint
loaded with safetensors or `model.state_dict()`), so the same code serves
tests with random weights and real checkpoints. The RoPE layout (half
split) and the SwiGLU MLP match ours, so no permutation is needed.
"""

from __future__ import annotations

from typing import Any, Mapping

from arches.convert import attention, model_from_params, swiglu, to_numpy
from arches.lm import DecoderLM, LMConfig

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


def config_from_hf(config: Any, mixer: str = "attention", **mixer_options) -> LMConfig:
  if getattr(config, "mlp_bias", False):
    raise ValueError("mlp_bias=True is not supported: our SwiGLU has no biases")
  if getattr(config, "attention_bias", False):  # biases on q, k, v and o
    mixer_options = {"use_bias": True, "out_bias": True, **mixer_options}
  heads = config.num_attention_heads
  return LMConfig(
      vocab_size=config.vocab_size, d_model=config.hidden_size,
      n_layers=config.num_hidden_layers,
      mixer={"name": mixer, "num_heads": heads,
             "num_kv_heads": getattr(config, "num_key_value_heads", heads),
             "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
             "position": rope_spec(config), **mixer_options},
      channel={"name": "swiglu", "hidden": config.intermediate_size},
      norm="rmsnorm", norm_eps=config.rms_norm_eps,
      tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def params_from_hf(config: Any, state_dict: Mapping[str, Any]) -> dict:
  """Our parameter dict from a Llama-family state dict."""
  sd = {k.removeprefix("model."): to_numpy(v) for k, v in state_dict.items()}
  heads = config.num_attention_heads
  kv = getattr(config, "num_key_value_heads", heads)
  hd = getattr(config, "head_dim", None) or config.hidden_size // heads
  blocks = {}
  for i in range(config.num_hidden_layers):
    p = f"layers.{i}."
    blocks[i] = {
        "mixer_norm": {"scale": sd[p + "input_layernorm.weight"]},
        "mixer": attention(sd, p + "self_attn.", heads, kv, hd),
        "channel_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
        "channel": swiglu(sd, p + "mlp."),
    }
  params = {"embed": {"embedding": sd["embed_tokens.weight"]}, "blocks": blocks,
            "final_norm": {"scale": sd["norm.weight"]}}
  if not getattr(config, "tie_word_embeddings", False):
    params["head"] = {"kernel": sd["lm_head.weight"].T}
  return params


def from_hf_llama(config: Any, state_dict: Mapping[str, Any], *,
                  mixer: str | None = None, **mixer_options) -> DecoderLM:
  """A DecoderLM with a HuggingFace Llama-family config and weights.

  The mixer follows the config: "sliding_window" with HF's window when
  `config.sliding_window` is set (Mistral; HF's window counts the query
  itself, as ours does), else dense "attention". `mixer`/`mixer_options`
  override that choice."""
  if mixer is None:
    window = getattr(config, "sliding_window", None)
    mixer = "attention" if window is None else "sliding_window"
    if window is not None:
      mixer_options = {"window": int(window), **mixer_options}
  return model_from_params(config_from_hf(config, mixer, **mixer_options),
                           params_from_hf(config, state_dict))
