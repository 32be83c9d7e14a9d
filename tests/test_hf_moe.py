"""Our MoE language models against HuggingFace's pure-PyTorch Mixtral,
Qwen2-MoE and Jamba (random tiny models built from configs, no download):
full-model logits and cached decoding, and a planted 1% router error that
each comparison catches."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from arches.convert import load  # noqa: E402
from arches.hf_moe import from_hf  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=32, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
              # HF's default 0.02 init makes attention and routing nearly
              # uniform, which would hide errors in both; 0.3 peaks them.
              initializer_range=0.3)


def mixtral():
  return transformers.MixtralConfig(
      **COMMON, intermediate_size=24, num_hidden_layers=2, num_local_experts=4,
      num_experts_per_tok=2, max_position_embeddings=64,
      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})


def qwen2_moe():
  return transformers.Qwen2MoeConfig(
      **COMMON, intermediate_size=40, moe_intermediate_size=16,
      shared_expert_intermediate_size=20, num_hidden_layers=3, num_experts=4,
      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
      max_position_embeddings=64)


def jamba():
  return transformers.JambaConfig(
      **COMMON, intermediate_size=24, num_hidden_layers=4, num_experts=4,
      num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
      expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
      mamba_dt_rank=4, mamba_expand=2, mamba_d_conv=4)


CONFIGS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "jamba": jamba}


def rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_and_ours(name):
  torch.manual_seed(0)
  config = CONFIGS[name]()
  config._attn_implementation = "eager"
  hf = CONFIGS_CLASSES[name](config).eval()
  if name == "qwen2_moe":  # HF starts routers at zero: uniform, testing nothing
    with torch.no_grad():
      for n, p in hf.named_parameters():
        if n.endswith("mlp.gate.weight"):
          p.normal_(0.0, 0.3)
  return hf, load(hf)


CONFIGS_CLASSES = {"mixtral": transformers.MixtralForCausalLM,
                   "qwen2_moe": transformers.Qwen2MoeForCausalLM,
                   "jamba": transformers.JambaForCausalLM}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_cached_decoding_match_hf_and_catch_a_planted_router_error(name):
  hf, ours = hf_and_ours(name)
  tokens = np.random.default_rng(0).integers(0, 97, (2, 12))
  with torch.no_grad():
    want = hf(torch.tensor(tokens), use_cache=False).logits.numpy()
  graphdef, state = nnx.split(ours)
  full = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  assert rel(np.asarray(full(state, jnp.asarray(tokens))), want) <= 1e-4

  step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c))
  cache = ours.init_cache(2, 12)
  got, cache = step(state, jnp.asarray(tokens[:, :7]), cache)
  pieces = [got]
  for t in range(7, 12):
    got, cache = step(state, jnp.asarray(tokens[:, t:t + 1]), cache)
    pieces.append(got)
  assert rel(np.concatenate([np.asarray(p) for p in pieces], 1), want) <= 1e-4

  # A router 1% off in one MoE layer moves the logits past the tolerance.
  layer = next(b for b in ours.blocks if type(b.channel).__name__ == "MoE")
  layer.channel.router_proj.kernel[...] *= 1.01
  assert rel(np.asarray(full(nnx.state(ours), jnp.asarray(tokens))), want) > 1e-4


def test_unknown_model_type_is_refused():
  with pytest.raises(ValueError, match="model_type 'llama' has no MoE converter"):
    from_hf(transformers.LlamaConfig(), {})
