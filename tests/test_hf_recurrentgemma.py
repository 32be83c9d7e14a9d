"""Griffin's recurrent layers against transformers' RecurrentGemmaForCausalLM
(pure PyTorch, CPU): a tiny random all-recurrent model converted with
arches.hf_recurrentgemma gives the same logits, over a full sequence and
through the decode path token by token. (Attention blocks are not converted
yet; the converter refuses them.)"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from arches.hf_recurrentgemma import config_from_hf, from_hf  # noqa: E402
from mixer_contract import rel_err  # noqa: E402

VOCAB, L = 64, 12


def hf_config(**kw):
  return transformers.RecurrentGemmaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, lru_width=48, conv1d_width=4, logits_soft_cap=30.0,
      **{"block_types": ["recurrent"], **kw})


@pytest.fixture(scope="module")
def models():
  torch.manual_seed(0)
  hf = transformers.RecurrentGemmaForCausalLM(hf_config()).eval()
  with torch.no_grad():  # move every weight off its structured init
    for name, p in hf.named_parameters():
      p.add_((0.3 if "recurrent_param" in name else 0.1) * torch.randn_like(p))
  return hf, from_hf(hf)


def test_logits_match_full_sequence(models):
  hf, ours = models
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, L))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens), use_cache=False).logits.numpy()
  got = nnx.jit(lambda m, t: m(t))(ours, jnp.asarray(tokens, jnp.int32))
  assert rel_err(got, ref) <= 1e-4


def test_decoding_matches_step_by_step(models):
  hf, ours = models
  B, prompt = 2, 4
  tokens = np.random.default_rng(1).integers(0, VOCAB, (B, L))
  pos = lambda a, b: torch.arange(a, b)[None].expand(B, -1)
  # transformers keeps the recurrent state in the modules and builds the
  # cache only when none is passed; an all-recurrent cache cannot count
  # tokens, so we pass the cache, the position ids and a (unused) mask.
  hf._setup_cache(hf.config, B, torch.device("cpu"), torch.float32)
  kw = dict(cache=transformers.DynamicCache(config=hf.config), use_cache=True,
            attention_mask={"sliding_attention": None})
  with torch.no_grad():
    ref = [hf(torch.tensor(tokens[:, :prompt]), position_ids=pos(0, prompt),
              **kw).logits.numpy()]
    for t in range(prompt, L):
      ref.append(hf(torch.tensor(tokens[:, t:t + 1]), position_ids=pos(t, t + 1),
                    **kw).logits.numpy())
  step = nnx.jit(lambda m, t, c: m(t, cache=c))
  cache = ours.init_cache(B, L)
  got = []
  for a, b in [(0, prompt)] + [(t, t + 1) for t in range(prompt, L)]:
    logits, cache = step(ours, jnp.asarray(tokens[:, a:b], jnp.int32), cache)
    got.append(logits)
  assert rel_err(np.concatenate(got, 1), np.concatenate(ref, 1)) <= 1e-4


def test_refuses_attention_blocks():
  with pytest.raises(ValueError, match="attention blocks"):
    config_from_hf(hf_config(block_types=["recurrent", "recurrent", "attention"]), 1.0)
