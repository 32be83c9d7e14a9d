"""HuggingFace transformers Mamba / Mamba-2 checkpoints -> (LMConfig, params).

    cfg, params = from_hf(hf_config, state_dict)   # MambaConfig or Mamba2Config
    model = model_from_params(cfg, params)         # arches.convert

HF Mamba blocks are `x + mixer(RMSNorm(x))` with no MLP, a final RMSNorm
and a (possibly tied) LM head, i.e. `LMConfig(channel=None,
norm="rmsnorm")`; both RMSNorms compute `weight * x * rsqrt(mean(x^2) +
eps)` in fp32, as `layers.norms.RMSNorm` does. Tensors may be torch
tensors or arrays; torch itself is not imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from arches.convert import Tensors, conv, dense, linear, lm_params, norm
from arches.lm import LMConfig


def _lm_config(config, mixer: str, **mixer_options) -> LMConfig:
  """The LMConfig fields both HF configs share."""
  if config.hidden_act != "silu":
    raise ValueError(f"HF config hidden_act={config.hidden_act!r} is not "
                     "supported; this converter needs 'silu'")
  return LMConfig(
      vocab_size=config.vocab_size, d_model=config.hidden_size,
      n_layers=config.num_hidden_layers, channel=None, norm="rmsnorm",
      norm_eps=config.layer_norm_epsilon,
      tie_embeddings=config.tie_word_embeddings,
      mixer={"name": mixer, "expand": config.expand,
             "d_state": config.state_size, "d_conv": config.conv_kernel,
             "use_bias": config.use_bias, "conv_bias": config.use_conv_bias,
             **mixer_options})


def _mamba_config(config) -> LMConfig:
  return _lm_config(config, "mamba", dt_rank=int(config.time_step_rank))


def _mamba2_config(config) -> LMConfig:
  if tuple(config.time_step_limit) != (0.0, float("inf")):
    raise ValueError(f"HF config time_step_limit={config.time_step_limit} is "
                     "not supported; this converter needs (0.0, inf) (no clamp)")
  return _lm_config(config, "mamba2", head_dim=config.head_dim,
                    n_groups=config.n_groups, chunk_size=config.chunk_size,
                    norm_eps=config.layer_norm_epsilon)


def mamba_mixer(sd: Tensors, p: str, d_inner: int) -> dict:
  """Our mamba mixer from HF's Mamba mixer under prefix `p` (also Jamba's)."""
  return {"in_proj": linear(sd, p + "in_proj", (2, d_inner)),  # rows: [x | z]
          "conv": conv(sd, p + "conv1d"),
          "x_proj": linear(sd, p + "x_proj"),                   # rows: [dt | B | C]
          "dt_proj": dense(sd[p + "dt_proj.weight"]),
          "dt_bias": sd[p + "dt_proj.bias"], "A_log": sd[p + "A_log"], "D": sd[p + "D"],
          "out_proj": linear(sd, p + "out_proj")}


def _mamba2_mixer(sd: Tensors, p: str, d_inner: int) -> dict:
  # HF in_proj rows: [z | x | B | C | dt]; ours: in_proj [x, z], bcdt_proj.
  w, b = sd[p + "in_proj.weight"], sd.get(p + "in_proj.bias")
  x_then_z = np.r_[d_inner:2 * d_inner, 0:d_inner]
  rows = lambda a, r: None if a is None else a[r]
  return {"in_proj": dense(w[x_then_z], rows(b, x_then_z), (2, d_inner)),
          "bcdt_proj": dense(w[2 * d_inner:], rows(b, slice(2 * d_inner, None))),
          "conv": conv(sd, p + "conv1d"),                       # channels: [x | B | C]
          "dt_bias": sd[p + "dt_bias"], "A_log": sd[p + "A_log"], "D": sd[p + "D"],
          "norm": {"weight": sd[p + "norm.weight"]},
          "out_proj": linear(sd, p + "out_proj")}


# HF model_type -> (LMConfig from its config, mixer params from its tensors).
KINDS = {"mamba": (_mamba_config, mamba_mixer), "mamba2": (_mamba2_config, _mamba2_mixer)}


def from_hf(config: Any, state_dict: Mapping[str, Any]) -> tuple[LMConfig, dict]:
  """(LMConfig, params) of a transformers MambaForCausalLM or
  Mamba2ForCausalLM, from its config and state dict."""
  if config.model_type not in KINDS:
    raise ValueError(f"HF model_type {config.model_type!r} is not a Mamba; "
                     f"supported: {sorted(KINDS)}")
  config_fn, mixer_fn = KINDS[config.model_type]
  cfg = config_fn(config)
  sd = Tensors(state_dict, strip="backbone.")
  d_inner = config.expand * config.hidden_size
  blocks = {i: {"mixer_norm": norm(sd, f"layers.{i}.norm"),
                "mixer": mixer_fn(sd, f"layers.{i}.mixer.", d_inner)}
            for i in range(config.num_hidden_layers)}
  return cfg, lm_params(sd, cfg, blocks, embed="embeddings", final_norm="norm_f")
