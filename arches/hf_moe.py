"""HuggingFace transformers mixture-of-experts models -> (LMConfig, params).

    cfg, params = from_hf(hf_model.config, hf_model.state_dict())
    model = model_from_params(cfg, params)          # arches.convert

Mixtral (`MixtralForCausalLM`): Llama blocks whose MLP is a top-k MoE with
the softmax over the chosen logits (router "topk_softmax"); router_aux_loss_coef
becomes balance_weight.
Qwen2-MoE (`Qwen2MoeForCausalLM`): q/k/v biases; MoE layers (every
decoder_sparse_step-th, not in mlp_only_layers; the others dense SwiGLU)
with softmax gates before top-k ("softmax_topk", renormalized when
norm_topk_prob) plus a shared SwiGLU expert scaled by sigmoid(w . x)
(shared_hidden, shared_gate).
Jamba (`JambaForCausalLM`): Mamba and attention layers in HF's
layers_block_type order (attention without positional encoding, Mamba with
RMSNorms on dt, B and C: the mamba mixer's bcdt_norm), MoE channel mixers
where layers_num_experts > 1 ("softmax_topk", gates not renormalized),
dense SwiGLU elsewhere.

Expert weights come as HF's stacked gate_up_proj [E, 2 I, D] (gate rows
first) and down_proj [E, D, I]. Every converted MoE uses dropless dispatch,
as HF computes every routed token. Tensors may be torch tensors or arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from arches.convert import Tensors, attention, linear, lm_params, norm, swiglu
from arches.hf_llama import blocks_from_hf as llama_blocks
from arches.hf_llama import config_from_hf as llama_config
from arches.hf_llama import heads as llama_heads
from arches.hf_llama import rope_spec
from arches.hf_mamba import mamba_mixer
from arches.lm import LMConfig


def _check_act(config) -> None:
  if config.hidden_act != "silu":
    raise ValueError(f"HF config hidden_act={config.hidden_act!r} is not "
                     "supported; the MoE converters need 'silu' (SwiGLU experts)")


def _experts(sd, prefix: str) -> dict:
  """Our stacked expert weights from HF's gate_up_proj and down_proj."""
  gate_up, down = sd[prefix + "gate_up_proj"], sd[prefix + "down_proj"]
  hidden = down.shape[-1]
  return {"gate": gate_up[:, :hidden].transpose(0, 2, 1),
          "up": gate_up[:, hidden:].transpose(0, 2, 1),
          "down": down.transpose(0, 2, 1)}


def _moe(sd, prefix: str, router: str, shared: bool = False) -> dict:
  out = {"router_proj": linear(sd, prefix + router), "experts": _experts(sd, prefix + "experts.")}
  if shared:
    out["shared"] = swiglu(sd, prefix + "shared_expert.")
    out["shared_gate"] = linear(sd, prefix + "shared_expert_gate")
  return out


# -- Mixtral ---------------------------------------------------------------------

def mixtral(config, state_dict) -> tuple[LMConfig, dict]:
  _check_act(config)
  cfg = llama_config(config)
  cfg = dataclasses.replace(cfg, channel={
      "name": "moe", "num_experts": config.num_local_experts,
      "top_k": config.num_experts_per_tok, "hidden": config.intermediate_size,
      "router": "topk_softmax", "balance_weight": float(config.router_aux_loss_coef),
      "z_weight": 0.0})
  sd = Tensors(state_dict, strip="model.")
  blocks = llama_blocks(config, sd, channel=lambda sd, p, _: _moe(sd, p, "gate"))
  return cfg, lm_params(sd, cfg, blocks, embed="embed_tokens", final_norm="norm")


# -- Qwen2-MoE -------------------------------------------------------------------

def _qwen_is_moe(config, i: int) -> bool:
  return (i not in config.mlp_only_layers and config.num_experts > 0
          and (i + 1) % config.decoder_sparse_step == 0)


def qwen2_moe(config, state_dict) -> tuple[LMConfig, dict]:
  _check_act(config)
  if config.use_sliding_window:
    raise ValueError("Qwen2-MoE with use_sliding_window=True is not supported; "
                     "the converter maps full attention only")
  heads = llama_heads(config)
  moe = {"name": "moe", "num_experts": config.num_experts,
         "top_k": config.num_experts_per_tok, "hidden": config.moe_intermediate_size,
         "router": "softmax_topk", "normalize_gates": bool(config.norm_topk_prob),
         "shared_hidden": config.shared_expert_intermediate_size, "shared_gate": True,
         "balance_weight": float(config.router_aux_loss_coef), "z_weight": 0.0}
  dense = {"name": "swiglu", "hidden": config.intermediate_size}
  moe_layers = [_qwen_is_moe(config, i) for i in range(config.num_hidden_layers)]
  cfg = LMConfig(
      vocab_size=config.vocab_size, d_model=config.hidden_size,
      n_layers=config.num_hidden_layers,
      mixer={"name": "attention", "num_heads": heads[0], "num_kv_heads": heads[1],
             "head_dim": heads[2], "position": rope_spec(config),
             "use_bias": bool(config.qkv_bias)},
      channel=[moe if m else dense for m in moe_layers],
      norm="rmsnorm", norm_eps=config.rms_norm_eps,
      tie_embeddings=bool(config.tie_word_embeddings))
  sd = Tensors(state_dict, strip="model.")
  blocks = llama_blocks(config, sd, lambda sd, p, i: (
      _moe(sd, p, "gate", shared=True) if moe_layers[i] else swiglu(sd, p)))
  return cfg, lm_params(sd, cfg, blocks, embed="embed_tokens", final_norm="norm")


# -- Jamba -----------------------------------------------------------------------

def _jamba_mamba(sd, p: str, inner: int) -> dict:
  """HF's Mamba mixer plus RMSNorms on dt, B and C."""
  return {**mamba_mixer(sd, p, inner),
          **{ours: norm(sd, f"{p}{hf}_layernorm")
             for ours, hf in (("dt_norm", "dt"), ("b_norm", "b"), ("c_norm", "c"))}}


def jamba(config, state_dict) -> tuple[LMConfig, dict]:
  _check_act(config)
  if config.mamba_proj_bias or not config.mamba_conv_bias:
    raise ValueError("Jamba with mamba_proj_bias=True or mamba_conv_bias=False "
                     "is not supported; the converter maps the released layout")
  heads = llama_heads(config)
  attn = {"name": "attention", "num_heads": heads[0], "num_kv_heads": heads[1],
          "head_dim": heads[2], "position": "none"}
  mamba = {"name": "mamba", "expand": config.mamba_expand, "d_state": config.mamba_d_state,
           "d_conv": config.mamba_d_conv, "dt_rank": config.mamba_dt_rank,
           "bcdt_norm": True, "bcdt_norm_eps": config.rms_norm_eps}
  moe = {"name": "moe", "num_experts": config.num_experts,
         "top_k": config.num_experts_per_tok, "hidden": config.intermediate_size,
         "router": "softmax_topk", "balance_weight": float(config.router_aux_loss_coef),
         "z_weight": 0.0}
  dense = {"name": "swiglu", "hidden": config.intermediate_size}
  kinds = list(config.layers_block_type)
  experts = list(config.layers_num_experts)
  cfg = LMConfig(
      vocab_size=config.vocab_size, d_model=config.hidden_size,
      n_layers=config.num_hidden_layers,
      mixer=[attn if k == "attention" else mamba for k in kinds],
      channel=[moe if n > 1 else dense for n in experts],
      norm="rmsnorm", norm_eps=config.rms_norm_eps,
      tie_embeddings=bool(config.tie_word_embeddings))
  sd = Tensors(state_dict, strip="model.")
  inner = config.mamba_expand * config.hidden_size
  blocks = {}
  for i, (kind, n) in enumerate(zip(kinds, experts, strict=True)):
    p = f"layers.{i}."
    blocks[i] = {
        "mixer_norm": norm(sd, p + "input_layernorm"),
        "mixer": (attention(sd, p + "self_attn.", *heads) if kind == "attention"
                  else _jamba_mamba(sd, p + "mamba.", inner)),
        "channel_norm": norm(sd, p + "pre_ff_layernorm"),
        "channel": (_moe(sd, p + "feed_forward.", "router") if n > 1
                    else swiglu(sd, p + "feed_forward.")),
    }
  return cfg, lm_params(sd, cfg, blocks, embed="embed_tokens", final_norm="final_layernorm")


CONVERTERS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "jamba": jamba}


def from_hf(config: Any, state_dict: Mapping[str, Any]) -> tuple[LMConfig, dict]:
  """(LMConfig, params) of a HF MoE model from its config and state dict."""
  if config.model_type not in CONVERTERS:
    raise ValueError(f"HF model_type {config.model_type!r} has no MoE converter; "
                     f"supported: {sorted(CONVERTERS)}")
  return CONVERTERS[config.model_type](config, state_dict)
