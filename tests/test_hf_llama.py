"""Our attention LM against HuggingFace's pure-PyTorch Llama (random tiny
model, no download): GQA, RoPE and its scaling variants, full forward and
cached decoding."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from arches.convert import load  # noqa: E402

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}


def hf_model(rope, kv_heads=2, tie=False, bias=False):
  params = {"rope_theta": 10000.0, "rope_type": "default"}
  if rope:
    params.update(rope)
  cfg = transformers.LlamaConfig(
      vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
      rms_norm_eps=1e-5, rope_parameters=params, tie_word_embeddings=tie,
      attention_bias=bias,
      attn_implementation="eager",
      # HF's default 0.02 init makes attention nearly uniform, which would
      # hide errors in positions and scaling; 0.3 gives peaked attention.
      initializer_range=0.3)
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(cfg).eval()


def rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("rope", list(ROPES))
def test_logits_match_llama(rope):
  hf = hf_model(ROPES[rope])
  ours = load(hf)
  tokens = np.random.default_rng(0).integers(0, 97, (2, 24))
  with torch.no_grad():
    want = hf(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(tokens)))
  assert rel(got, want) <= 1e-4


@pytest.mark.parametrize("kv_heads,tie,bias", [(1, True, False), (4, False, True)])
def test_mqa_mha_tied_biased_and_cached_decoding_match_llama(kv_heads, tie, bias):
  hf = hf_model(None, kv_heads=kv_heads, tie=tie, bias=bias)
  if bias:  # HF initializes biases to zero, which would test nothing
    with torch.no_grad():
      for name, p in hf.named_parameters():
        if name.endswith("bias"):
          p.normal_(0.0, 0.3)
  ours = load(hf)
  tokens = np.random.default_rng(1).integers(0, 97, (1, 12))
  with torch.no_grad():
    want = hf(torch.tensor(tokens)).logits.numpy()
  cache = ours.init_cache(1, 16)
  got, cache = ours(jnp.asarray(tokens[:, :7]), cache=cache)
  steps = [got]
  for t in range(7, 12):
    lg, cache = ours(jnp.asarray(tokens[:, t:t + 1]), cache=cache)
    steps.append(lg)
  got = np.concatenate([np.asarray(s) for s in steps], axis=1)
  assert rel(got, want) <= 1e-4


def test_unsupported_rope_type_is_refused():
  hf = hf_model({"rope_type": "dynamic", "factor": 2.0})
  with pytest.raises(ValueError, match="rope_type 'dynamic'"):
    load(hf)
