"""Import HuggingFace Llama / Mistral-style decoder weights into DecoderLM.

    model = from_hf_llama(hf_config, hf_state_dict)

Works from a state dict of torch tensors or numpy arrays (a checkpoint
loaded with safetensors or `model.state_dict()`), so the same code serves
tests with random weights and real checkpoints. The RoPE layout (half
split) and the SwiGLU MLP match ours, so no permutation is needed.
"""

from __future__ import annotations

from typing import Any, Mapping

from arches.convert import model_from_params, to_numpy
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
  return spec


def config_from_hf(config: Any, mixer: str = "attention", **mixer_options) -> LMConfig:
  for flag in ("attention_bias", "mlp_bias"):
    if getattr(config, flag, False):
      raise ValueError(f"{flag}=True is not supported: our attention has no "
                       "output bias and our SwiGLU no biases")
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

  def proj(name, n):  # [n*hd, d_model] -> [d_model, n, hd]
    out = {"kernel": sd[name + ".weight"].T.reshape(-1, n, hd)}
    if name + ".bias" in sd:
      out["bias"] = sd[name + ".bias"].reshape(n, hd)
    return out

  blocks = {}
  for i in range(config.num_hidden_layers):
    p = f"layers.{i}."
    a, m = p + "self_attn.", p + "mlp."
    blocks[i] = {
        "mixer_norm": {"scale": sd[p + "input_layernorm.weight"]},
        "mixer": {"proj": {
            "q": proj(a + "q_proj", heads), "k": proj(a + "k_proj", kv),
            "v": proj(a + "v_proj", kv),
            "o": {"kernel": sd[a + "o_proj.weight"].T.reshape(heads, hd, -1)}}},
        "channel_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
        "channel": {k: {"kernel": sd[f"{m}{k}_proj.weight"].T}
                    for k in ("gate", "up", "down")},
    }
  params = {"embed": {"embedding": sd["embed_tokens.weight"]}, "blocks": blocks,
            "final_norm": {"scale": sd["norm.weight"]}}
  if not getattr(config, "tie_word_embeddings", False):
    params["head"] = {"kernel": sd["lm_head.weight"].T}
  return params


def from_hf_llama(config: Any, state_dict: Mapping[str, Any], *,
                  mixer: str = "attention", **mixer_options) -> DecoderLM:
  """A DecoderLM with a HuggingFace Llama-family config and weights.

  `mixer`/`mixer_options` select the attention variant ("sliding_window"
  with window=... for Mistral)."""
  return model_from_params(config_from_hf(config, mixer, **mixer_options),
                           params_from_hf(config, state_dict))
