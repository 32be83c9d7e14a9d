"""HuggingFace transformers RWKV-4 (`RwkvForCausalLM`) -> DecoderLM.

    model = from_hf(hf_model)      # a DecoderLM with rwkv4 + rwkv4_channel

The block structure is the same as ours: ln0 on the embeddings (our
embed_norm), then per layer x += time_mix(ln1(x)); x += channel_mix(ln2(x)),
then ln_out and the head. torch is only needed by the caller: the
converter reads `state_dict()` tensors through numpy.
"""

from __future__ import annotations


from arches.convert import model_from_params, to_numpy
from arches.lm import DecoderLM, LMConfig

# torch.nn.LayerNorm's default eps, which transformers' RWKV uses for ln_out
# whatever config.layer_norm_epsilon says (ours has one eps for all norms).
LN_OUT_EPS = 1e-5


def config_from_hf(hf_config) -> LMConfig:
  c = hf_config
  if c.attention_hidden_size not in (None, c.hidden_size):
    raise ValueError(f"attention_hidden_size={c.attention_hidden_size} != "
                     f"hidden_size={c.hidden_size} is not supported (rwkv4 "
                     "mixes at d_model width)")
  if c.layer_norm_epsilon != LN_OUT_EPS:
    raise ValueError(f"layer_norm_epsilon={c.layer_norm_epsilon} differs from "
                     f"ln_out's fixed {LN_OUT_EPS}; one eps for all norms is "
                     "supported")
  hidden = c.intermediate_size or 4 * c.hidden_size
  return LMConfig(vocab_size=c.vocab_size, d_model=c.hidden_size,
                  n_layers=c.num_hidden_layers, mixer="rwkv4",
                  channel={"name": "rwkv4_channel", "hidden": hidden},
                  norm="layernorm", norm_eps=c.layer_norm_epsilon,
                  embed_norm=True, tie_embeddings=c.tie_word_embeddings)


def _norm(sd, name):
  return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def _dense(sd, name):
  return {"kernel": sd[f"{name}.weight"].T}


def params_from_hf(hf_model) -> dict:
  """Our parameter dict from an RwkvForCausalLM's weights."""
  if hf_model.rwkv.layers_are_rescaled:
    raise ValueError("the RWKV weights were rescaled in place by an "
                     "inference forward with rescale_every > 0; convert "
                     "before running the model, or set rescale_every=0")
  sd = {k: to_numpy(v) for k, v in hf_model.state_dict().items()}
  flat = lambda a: a.reshape(-1)  # time_mix_* are [1, 1, d]
  blocks = {}
  for i in range(hf_model.config.num_hidden_layers):
    p = f"rwkv.blocks.{i}"
    att, ffn = f"{p}.attention", f"{p}.feed_forward"
    blocks[i] = {
        "mixer_norm": _norm(sd, f"{p}.ln1"),
        "channel_norm": _norm(sd, f"{p}.ln2"),
        "mixer": {
            "time_decay": sd[f"{att}.time_decay"],
            "time_first": sd[f"{att}.time_first"],
            "mu_k": flat(sd[f"{att}.time_mix_key"]),
            "mu_v": flat(sd[f"{att}.time_mix_value"]),
            "mu_r": flat(sd[f"{att}.time_mix_receptance"]),
            **{name: _dense(sd, f"{att}.{name}")
               for name in ("key", "value", "receptance", "output")},
        },
        "channel": {
            "mu_k": flat(sd[f"{ffn}.time_mix_key"]),
            "mu_r": flat(sd[f"{ffn}.time_mix_receptance"]),
            **{name: _dense(sd, f"{ffn}.{name}")
               for name in ("key", "receptance", "value")},
        },
    }
  params = {"embed": {"embedding": sd["rwkv.embeddings.weight"]},
            "embed_norm": _norm(sd, "rwkv.blocks.0.pre_ln"),
            "blocks": blocks,
            "final_norm": _norm(sd, "rwkv.ln_out")}
  if not hf_model.config.tie_word_embeddings:
    params["head"] = _dense(sd, "head")
  return params


def from_hf(hf_model) -> DecoderLM:
  return model_from_params(config_from_hf(hf_model.config), params_from_hf(hf_model))
