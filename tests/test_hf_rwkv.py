"""RWKV-4 against transformers' RwkvForCausalLM (pure PyTorch, CPU): a tiny
random model converted with arches.hf_rwkv gives the same logits, over a
full sequence and token by token through the decode path."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from arches.convert import load  # noqa: E402
from mixer_contract import rel_err  # noqa: E402

VOCAB, L = 64, 12


@pytest.fixture(scope="module")
def models():
  torch.manual_seed(0)
  cfg = transformers.RwkvConfig(vocab_size=VOCAB, context_length=64, hidden_size=32,
                                num_hidden_layers=2, intermediate_size=48,
                                rescale_every=0, tie_word_embeddings=False)
  hf = transformers.RwkvForCausalLM(cfg).eval()
  with torch.no_grad():  # move every weight off its structured init
    for p in hf.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return hf, load(hf)


def test_logits_match_full_sequence(models):
  hf, ours = models
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, L))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  got = nnx.jit(lambda m, t: m(t))(ours, jnp.asarray(tokens, jnp.int32))
  assert rel_err(got, ref) <= 1e-4


def test_decoding_matches_step_by_step(models):
  # transformers' single-token RWKV step broadcasts wrongly for batch > 1,
  # so the reference decodes batch 1.
  hf, ours = models
  tokens = np.random.default_rng(1).integers(0, VOCAB, (1, L))
  prompt = 4
  with torch.no_grad():
    out = hf(torch.tensor(tokens[:, :prompt]), use_cache=True)
    ref, state = [out.logits.numpy()], out.state
    for t in range(prompt, L):
      out = hf(torch.tensor(tokens[:, t:t + 1]), state=state, use_cache=True)
      ref.append(out.logits.numpy())
      state = out.state
  step = nnx.jit(lambda m, t, c: m(t, cache=c))
  cache = ours.init_cache(1, L)
  got, cache = step(ours, jnp.asarray(tokens[:, :prompt], jnp.int32), cache)
  got = [got]
  for t in range(prompt, L):
    logits, cache = step(ours, jnp.asarray(tokens[:, t:t + 1], jnp.int32), cache)
    got.append(logits)
  assert rel_err(np.concatenate(got, 1), np.concatenate(ref, 1)) <= 1e-4


def test_refuses_rescaled_weights(models):
  hf, _ = models
  hf.rwkv.layers_are_rescaled = True
  try:
    with pytest.raises(ValueError, match="rescale_every"):
      load(hf)
  finally:
    hf.rwkv.layers_are_rescaled = False
