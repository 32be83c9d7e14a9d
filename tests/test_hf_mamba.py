"""Our Mamba / Mamba-2 LMs against HuggingFace transformers' pure-PyTorch
models with the same (random) weights: full-sequence logits, and our
incremental decoding against HF's cached decoding, token by token."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from arches.convert import load, model_from_params  # noqa: E402
from arches.hf_mamba import from_hf  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8)
B, L, PREFILL = 2, 12, 5


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def randomized(model):
  """Perturb every weight so that ones/zeros inits (norms, D, conv bias)
  cannot hide a transposed or misplaced tensor."""
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def hf_model(kind, **overrides):
  torch.manual_seed(0)
  if kind == "mamba":
    cfg = transformers.MambaConfig(**TINY, **overrides)
    return randomized(transformers.MambaForCausalLM(cfg))
  cfg = transformers.Mamba2Config(**TINY, head_dim=16, num_heads=4,
                                  **overrides)
  return randomized(transformers.Mamba2ForCausalLM(cfg))


def hf_logits(model, ids):
  """Full-sequence logits, then prefill + one token at a time via HF's
  cache, [B, L, V] each."""
  ids = torch.tensor(np.array(ids), dtype=torch.long)
  with torch.no_grad():
    full = model(ids).logits.numpy()
    out = model(ids[:, :PREFILL], use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(PREFILL, L):
      out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
      steps.append(out.logits)
      cache = out.cache
  return full, torch.cat(steps, 1).numpy()


def our_decode(model, ids):
  cache = model.init_cache(B, L)
  logits, cache = model(ids[:, :PREFILL], cache=cache)
  steps = [logits]
  for t in range(PREFILL, L):
    logits, cache = model(ids[:, t:t + 1], cache=cache)
    steps.append(logits)
  return np.concatenate(steps, 1)


# Between them: tied and untied heads, biases, B/C groups (and the norm's
# groups), several chunks with a padded tail.
CASES = {
    "mamba": ("mamba", dict(tie_word_embeddings=False, use_bias=True)),
    "mamba2": ("mamba2", dict(tie_word_embeddings=True, use_bias=True,
                              n_groups=2, chunk_size=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_decoding_match_hf(case):
  kind, overrides = CASES[case]
  hf = hf_model(kind, **overrides)
  ours = load(hf)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (B, L)), jnp.int32)
  hf_full, hf_steps = hf_logits(hf, ids)
  assert rel_err(hf_steps, hf_full) < 1e-5  # HF's own two paths agree
  assert rel_err(ours(ids), hf_full) <= 1e-4
  assert rel_err(our_decode(ours, ids), hf_steps) <= 1e-4


def test_converter_rejects_what_it_cannot_map():
  hf = hf_model("mamba")
  state = dict(hf.state_dict())
  convert = lambda config: model_from_params(*from_hf(config, state))
  with pytest.raises(ValueError, match="HF config"):
    convert(transformers.MambaConfig(**TINY, hidden_act="gelu"))
  state["backbone.layers.0.mixer.extra"] = state["backbone.layers.0.mixer.D"]
  with pytest.raises(ValueError, match="not used.*extra"):
    convert(hf.config)
  del state["backbone.layers.0.mixer.extra"], state["backbone.layers.1.mixer.D"]
  with pytest.raises(ValueError, match="no tensor 'layers.1.mixer.D'"):
    convert(hf.config)
  state["backbone.layers.1.mixer.D"] = state["backbone.layers.0.mixer.A_log"]
  with pytest.raises(ValueError, match="shape"):
    convert(hf.config)
