"""`sliding_window` reproduces HuggingFace Mistral attention (sliding window,
GQA, RoPE) with converted weights, in fp32."""

import numpy as np
import pytest
from flax import nnx

from arches.hf_convert_attention import attention_options, load_attention
from layers import mixers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WINDOW, LENGTH = 5, 23


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def hf_attention():
  """A tiny random one-layer Mistral (eager attention, no download); the
  attention layer's input and output captured from a real forward pass, so
  HF builds its own sliding-window mask."""
  torch.manual_seed(0)
  config = transformers.MistralConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=11,
      sliding_window=WINDOW, rope_theta=500.0, attn_implementation="eager")
  model = transformers.MistralModel(config).eval()
  attn = model.layers[0].self_attn
  seen = {}
  attn.register_forward_hook(
      lambda mod, args, kwargs, out: seen.update(x=kwargs["hidden_states"],
                                                 y=out[0]),
      with_kwargs=True)
  with torch.no_grad():
    model(inputs_embeds=torch.randn(2, LENGTH, 32))
  return config, attn, seen["x"].numpy(), seen["y"].numpy()


def converted(config, attn, **override):
  options = {**attention_options(config), **override}
  mixer = mixers.build("sliding_window", config.hidden_size, rngs=nnx.Rngs(0),
                       **options)
  load_attention(mixer.proj, attn)
  return mixer


@pytest.mark.parametrize("block_size", [None, 3])
def test_matches_hf_mistral(hf_attention, block_size):
  config, attn, x, y_hf = hf_attention
  mixer = converted(config, attn, block_size=block_size)
  assert mixer.window == WINDOW and mixer.num_kv_heads == 2
  assert rel_err(mixer(x), y_hf) <= 1e-4


@pytest.mark.parametrize("wrong", [{"window": WINDOW - 1}, {"window": WINDOW + 1},
                                   {"position": {"name": "rope"}}])
def test_comparison_can_fail(hf_attention, wrong):
  """A window one key off, or the default RoPE base, visibly differs."""
  config, attn, x, y_hf = hf_attention
  assert rel_err(converted(config, attn, **wrong)(x), y_hf) > 1e-3


def test_converter_rejects_mismatched_bias(hf_attention):
  config, attn, _, _ = hf_attention
  mixer = mixers.build("sliding_window", 32, rngs=nnx.Rngs(0), use_bias=True,
                       **attention_options(config))
  with pytest.raises(ValueError, match="use_bias"):
    load_attention(mixer.proj, attn)
