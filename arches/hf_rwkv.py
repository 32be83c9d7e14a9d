"""HuggingFace transformers RWKV-4 (`RwkvForCausalLM`) -> (LMConfig, params).

    cfg, params = from_hf(hf_config, state_dict)   # rwkv4 + rwkv4_channel

The block structure is the same as ours: ln0 on the embeddings (our
embed_norm), then per layer x += time_mix(ln1(x)); x += channel_mix(ln2(x)),
then ln_out and the head. torch is only needed by the caller: the
converter reads `state_dict()` tensors through numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arches.convert import Tensors, linear, lm_params, norm
from arches.lm import LMConfig

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


def from_hf(config: Any, state_dict: Mapping[str, Any]) -> tuple[LMConfig, dict]:
  """(LMConfig, params) of an RwkvForCausalLM from its config and state
  dict. `arches.convert.load` also refuses a live model whose weights
  transformers rescaled in place."""
  cfg = config_from_hf(config)
  sd = Tensors(state_dict, strip="rwkv.")
  flat = lambda a: a.reshape(-1)  # time_mix_* are [1, 1, d]
  blocks = {}
  for i in range(config.num_hidden_layers):
    att, ffn = f"blocks.{i}.attention", f"blocks.{i}.feed_forward"
    blocks[i] = {
        "mixer_norm": norm(sd, f"blocks.{i}.ln1"),
        "channel_norm": norm(sd, f"blocks.{i}.ln2"),
        "mixer": {
            "time_decay": sd[f"{att}.time_decay"],
            "time_first": sd[f"{att}.time_first"],
            "mu_k": flat(sd[f"{att}.time_mix_key"]),
            "mu_v": flat(sd[f"{att}.time_mix_value"]),
            "mu_r": flat(sd[f"{att}.time_mix_receptance"]),
            **{name: linear(sd, f"{att}.{name}")
               for name in ("key", "value", "receptance", "output")},
        },
        "channel": {
            "mu_k": flat(sd[f"{ffn}.time_mix_key"]),
            "mu_r": flat(sd[f"{ffn}.time_mix_receptance"]),
            **{name: linear(sd, f"{ffn}.{name}")
               for name in ("key", "receptance", "value")},
        },
    }
  params = {"embed_norm": norm(sd, "blocks.0.pre_ln"),
            **lm_params(sd, cfg, blocks, embed="embeddings", final_norm="ln_out",
                         head="head")}
  return cfg, params
