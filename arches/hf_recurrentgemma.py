"""HuggingFace transformers RecurrentGemma (Griffin) -> DecoderLM.

    model = from_hf(hf_model)

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

from arches.convert import model_from_params, to_numpy
from arches.hf_llama import rope_spec
from arches.lm import DecoderLM, LMConfig

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


def config_from_hf(hf_config, embed_scale: float) -> LMConfig:
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
      tie_embeddings=c.tie_word_embeddings, embed_scale=embed_scale,
      logit_softcap=c.logits_soft_cap)


def _dense(sd, name, in_shape=None, out_shape=None):
  """torch Linear weight [out, in] -> kernel [*in_shape, *out_shape] (head
  axes split out where given), bias [*out_shape] when HF has one; a bias
  on one side only is caught by `model_from_params` as a missing or
  unexpected entry."""
  w = sd[f"{name}.weight"].T
  in_shape, out_shape = in_shape or w.shape[:1], out_shape or w.shape[1:]
  out = {"kernel": w.reshape(*in_shape, *out_shape)}
  if f"{name}.bias" in sd:
    out["bias"] = sd[f"{name}.bias"].reshape(out_shape)
  return out


def _rms(sd, name):
  return {"scale": 1.0 + sd[f"{name}.weight"]}


def _recurrent(sd, p, c):
  lru = f"{p}.rg_lru"
  gate = lambda g: {"w": sd[f"{lru}.{g}_gate_weight"], "b": sd[f"{lru}.{g}_gate_bias"]}
  return {"gate_proj": _dense(sd, f"{p}.linear_y"),
          "in_proj": _dense(sd, f"{p}.linear_x"),
          "out_proj": _dense(sd, f"{p}.linear_out"),
          "conv": {"weight": sd[f"{p}.conv_1d.weight"][:, 0, :].T,  # [W, 1, K] -> [K, W]
                   "bias": sd[f"{p}.conv_1d.bias"]},
          "input_gate": gate("input"), "a_gate": gate("recurrent"),
          "a_param": sd[f"{lru}.recurrent_param"]}


def _attention(sd, p, c):
  D, K = c.hidden_size, c.head_dim
  split = lambda proj, n: _dense(sd, f"{p}.{proj}_proj", (D,), (n, K))
  return {"proj": {"q": split("q", c.num_attention_heads),
                   "k": split("k", c.num_key_value_heads),
                   "v": split("v", c.num_key_value_heads),
                   "o": _dense(sd, f"{p}.o_proj", (c.num_attention_heads, K), (D,))}}


BLOCKS = {"recurrent": _recurrent, "attention": _attention}


def params_from_hf(hf_model) -> dict:
  c = hf_model.config
  sd = {k: to_numpy(v) for k, v in hf_model.state_dict().items()}
  blocks = {}
  for i in range(c.num_hidden_layers):
    p = f"model.layers.{i}"
    kind = c.block_types[i % len(c.block_types)]
    blocks[i] = {
        "mixer_norm": _rms(sd, f"{p}.temporal_pre_norm"),
        "channel_norm": _rms(sd, f"{p}.channel_pre_norm"),
        "mixer": BLOCKS[kind](sd, f"{p}.temporal_block", c),
        "channel": {ours: _dense(sd, f"{p}.mlp_block.{theirs}") for ours, theirs in
                    (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))},
    }
  params = {"embed": {"embedding": sd["model.embed_tokens.weight"]},
            "blocks": blocks, "final_norm": _rms(sd, "model.final_norm")}
  if not c.tie_word_embeddings:
    params["head"] = {"kernel": sd["lm_head.weight"].T}
  return params


def from_hf(hf_model) -> DecoderLM:
  # transformers keeps sqrt(hidden_size) as a bf16 buffer and multiplies by
  # that rounded value; use the same number.
  scale = float(hf_model.model.normalizer.float())
  return model_from_params(config_from_hf(hf_model.config, scale),
                           params_from_hf(hf_model))
