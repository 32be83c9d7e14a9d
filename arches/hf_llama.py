"""Import HuggingFace Llama / Mistral-style decoder weights into DecoderLM.

    model = from_hf_llama(hf_config, hf_state_dict)

Works from a state dict of torch tensors or numpy arrays (a checkpoint
loaded with safetensors or `model.state_dict()`), so the same code serves
tests with random weights and real checkpoints. The RoPE layout (half
split) and the SwiGLU MLP match ours, so no permutation is needed.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def to_numpy(t) -> np.ndarray:
  if hasattr(t, "detach"):
    t = t.detach().float().cpu().numpy()
  return np.asarray(t, np.float32)


def set_param(var: nnx.Variable, value: np.ndarray, name: str) -> None:
  if tuple(var.shape) != tuple(value.shape):
    raise ValueError(f"{name}: checkpoint shape {value.shape} != model shape "
                     f"{tuple(var.shape)}")
  var[...] = jnp.asarray(value, var.dtype)  # keeps fp32 master weights


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


def load_hf_weights(model: DecoderLM, state_dict: Mapping[str, Any]) -> DecoderLM:
  sd = {k.removeprefix("model."): to_numpy(v) for k, v in state_dict.items()}
  used = set()

  def take(key):
    if key not in sd:
      raise KeyError(f"checkpoint has no {key!r}")
    used.add(key)
    return sd[key]

  set_param(model.embed.embedding, take("embed_tokens.weight"), "embed_tokens")
  for i, block in enumerate(model.blocks):
    p = f"layers.{i}."
    proj = block.mixer.proj
    for ours, theirs in ((proj.q, "q_proj"), (proj.k, "k_proj"), (proj.v, "v_proj")):
      w = take(p + f"self_attn.{theirs}.weight")  # [heads*head_dim, d_model]
      set_param(ours.kernel, w.T.reshape(ours.kernel.shape), p + theirs)
      if ours.bias is not None:
        set_param(ours.bias, take(p + f"self_attn.{theirs}.bias").reshape(
            ours.bias.shape), p + theirs + ".bias")
    w = take(p + "self_attn.o_proj.weight")  # [d_model, heads*head_dim]
    set_param(proj.o.kernel, w.T.reshape(proj.o.kernel.shape), p + "o_proj")
    set_param(block.mixer_norm.scale, take(p + "input_layernorm.weight"), p + "ln1")
    set_param(block.channel_norm.scale, take(p + "post_attention_layernorm.weight"),
              p + "ln2")
    for ours, theirs in ((block.channel.gate, "gate_proj"), (block.channel.up, "up_proj"),
                         (block.channel.down, "down_proj")):
      set_param(ours.kernel, take(p + f"mlp.{theirs}.weight").T, p + theirs)
  set_param(model.final_norm.scale, take("norm.weight"), "norm")
  if model.head is not None:
    set_param(model.head.kernel, take("lm_head.weight").T, "lm_head")
  unused = sorted(set(sd) - used - {"lm_head.weight"})
  if unused:
    raise ValueError(f"checkpoint tensors not loaded: {unused[:8]}")
  return model


def from_hf_llama(config: Any, state_dict: Mapping[str, Any], *,
                  mixer: str = "attention", **mixer_options) -> DecoderLM:
  """A DecoderLM with a HuggingFace Llama-family config and weights.

  `mixer`/`mixer_options` select the attention variant ("sliding_window"
  with window=... for Mistral)."""
  model = DecoderLM(config_from_hf(config, mixer, **mixer_options), rngs=nnx.Rngs(0))
  return load_hf_weights(model, state_dict)
