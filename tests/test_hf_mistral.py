"""`sliding_window` in our LM reproduces HuggingFace's pure-PyTorch Mistral
(sliding window, GQA, RoPE): a tiny random model (no download), converted
with `arches.hf_llama`, compared in fp32, full forward and cached decoding
through the ring buffer."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import dataclasses  # noqa: E402

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from arches.convert import model_from_params  # noqa: E402
from arches.hf_llama import from_hf  # noqa: E402

WINDOW, LENGTH = 5, 23


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def mistral():
  config = transformers.MistralConfig(
      vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
      sliding_window=WINDOW, rope_theta=500.0, rms_norm_eps=1e-5,
      attn_implementation="eager",
      # HF's default 0.02 init makes attention nearly uniform, which would
      # hide a window one key off; 0.3 gives peaked attention.
      initializer_range=0.3)
  torch.manual_seed(0)
  hf = transformers.MistralForCausalLM(config).eval()
  tokens = np.random.default_rng(0).integers(0, 97, (2, LENGTH))
  with torch.no_grad():
    logits = hf(torch.tensor(tokens)).logits.numpy()
  return hf, tokens, logits


# Models never jit themselves; one jitted forward and one step per shape.
forward = nnx.jit(lambda model, tokens: model(tokens))
step = nnx.jit(lambda model, tokens, cache: model(tokens, cache=cache))


def ours(hf, **options):
  # HF masks keys with kv_idx <= q_idx - sliding_window: `window` keys
  # including the query, which is our `window`. The importer reads it from
  # the config and picks `sliding_window` by itself; `options` override
  # the converted mixer's.
  cfg, params = from_hf(hf.config, hf.state_dict())
  cfg = dataclasses.replace(cfg, mixer={**cfg.mixer, **options})
  model = model_from_params(cfg, params)
  assert type(model.blocks[0].mixer).registered_name == "sliding_window"
  return model


@pytest.mark.parametrize("block_size", [None, 3])
def test_logits_match_mistral(mistral, block_size):
  hf, tokens, want = mistral
  got = forward(ours(hf, block_size=block_size), jnp.asarray(tokens))
  assert rel_err(got, want) <= 1e-4


def test_cached_decoding_matches_mistral(mistral):
  """A prompt longer than the window, then single tokens, through the ring."""
  hf, tokens, want = mistral
  model = ours(hf)
  cache = model.init_cache(2, LENGTH)
  got, cache = step(model, jnp.asarray(tokens[:, :9]), cache)
  steps = [got]
  for t in range(9, LENGTH):
    logits, cache = step(model, jnp.asarray(tokens[:, t:t + 1]), cache)
    steps.append(logits)
  assert rel_err(np.concatenate(steps, axis=1), want) <= 1e-4


@pytest.mark.parametrize("window", [WINDOW - 1, WINDOW + 1])
def test_window_off_by_one_is_caught(mistral, window):
  """The comparison can fail: a window one key narrower or wider differs."""
  hf, tokens, want = mistral
  assert rel_err(forward(ours(hf, window=window), jnp.asarray(tokens)), want) > 1e-3
