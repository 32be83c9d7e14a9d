"""HuggingFace transformers RecurrentGemma (Griffin) -> DecoderLM.

    model = from_hf(hf_model)

Recurrent layers become `rglru` mixers, the MLP a `swiglu` with
activation="gelu_tanh" and biases (hidden = intermediate_size // 2, as
transformers splits it), RMSNorm weights w become our scale 1 + w (Gemma
normalizes with x * (1 + w)), the embedding scale is transformers'
bf16-rounded sqrt(hidden_size), logits are soft-capped.

Attention layers (local MQA with partial RoPE and a biased output
projection) have no mixer here yet: a config whose block_types contain
"attention" is refused with a message saying so.
"""

from __future__ import annotations

from arches.convert import model_from_params, to_numpy
from arches.lm import DecoderLM, LMConfig

GELU_TANH = "gelu_pytorch_tanh"


def config_from_hf(hf_config, embed_scale: float) -> LMConfig:
  c = hf_config
  if c.hidden_activation != GELU_TANH:
    raise ValueError(f"hidden_activation {c.hidden_activation!r} is not "
                     f"supported; RecurrentGemma uses {GELU_TANH!r}")
  if "attention" in c.block_types:
    raise ValueError(
        f"block_types {c.block_types}: attention blocks (local MQA, window "
        f"{c.attention_window_size}, partial RoPE, biased o_proj) are not "
        "converted yet; only block_types=['recurrent'] models are")
  recurrent = {"name": "rglru", "width": c.lru_width,
               "num_heads": c.num_attention_heads, "conv_width": c.conv1d_width}
  return LMConfig(
      vocab_size=c.vocab_size, d_model=c.hidden_size,
      n_layers=c.num_hidden_layers, mixer=recurrent,
      channel={"name": "swiglu", "hidden": c.intermediate_size // 2,
               "activation": "gelu_tanh", "use_bias": True},
      norm="rmsnorm", norm_eps=c.rms_norm_eps,
      tie_embeddings=c.tie_word_embeddings, embed_scale=embed_scale,
      logit_softcap=c.logits_soft_cap)


def _dense(sd, name):
  return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}


def _rms(sd, name):
  return {"scale": 1.0 + sd[f"{name}.weight"]}


def _recurrent(sd, p):
  lru = f"{p}.rg_lru"
  gate = lambda g: {"w": sd[f"{lru}.{g}_gate_weight"], "b": sd[f"{lru}.{g}_gate_bias"]}
  return {"gate_proj": _dense(sd, f"{p}.linear_y"),
          "in_proj": _dense(sd, f"{p}.linear_x"),
          "out_proj": _dense(sd, f"{p}.linear_out"),
          "conv_w": sd[f"{p}.conv_1d.weight"][:, 0, :].T,  # [W, 1, K] -> [K, W]
          "conv_b": sd[f"{p}.conv_1d.bias"],
          "input_gate": gate("input"), "a_gate": gate("recurrent"),
          "a_param": sd[f"{lru}.recurrent_param"]}


def params_from_hf(hf_model) -> dict:
  sd = {k: to_numpy(v) for k, v in hf_model.state_dict().items()}
  blocks = {}
  for i in range(hf_model.config.num_hidden_layers):
    p = f"model.layers.{i}"
    blocks[i] = {
        "mixer_norm": _rms(sd, f"{p}.temporal_pre_norm"),
        "channel_norm": _rms(sd, f"{p}.channel_pre_norm"),
        "mixer": _recurrent(sd, f"{p}.temporal_block"),
        "channel": {ours: _dense(sd, f"{p}.mlp_block.{theirs}") for ours, theirs in
                    (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))},
    }
  params = {"embed": {"embedding": sd["model.embed_tokens.weight"]},
            "blocks": blocks, "final_norm": _rms(sd, "model.final_norm")}
  if not hf_model.config.tie_word_embeddings:
    params["head"] = {"kernel": sd["lm_head.weight"].T}
  return params


def from_hf(hf_model) -> DecoderLM:
  # transformers keeps sqrt(hidden_size) as a bf16 buffer and multiplies by
  # that rounded value; use the same number.
  scale = float(hf_model.model.normalizer.float())
  return model_from_params(config_from_hf(hf_model.config, scale),
                           params_from_hf(hf_model))
