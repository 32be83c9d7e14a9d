"""RoPE rescaled at test time (arches.extend): the trained weights load into
the rescaled model unchanged, factor 1 is plain RoPE, only plain-RoPE
layers change, and configs that cannot use it fail when built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arches.extend import EXTENSIONS, extend_rope
from arches.lm import DecoderLM, LMConfig
from arches.validation import ConfigError
from layers import positions
from train import configs

ALIBI = {"name": "attention", "position": "alibi"}
ROPE = {"name": "attention", "position": {"name": "rope", "base": 500.0}}
CFG = LMConfig(vocab_size=32, d_model=16, n_layers=2, mixer=[ROPE, ALIBI])


def logits_with(cfg: LMConfig, state, tokens):
  """`state` (a model's full nnx state) loaded into the model `cfg` builds."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))))
  assert jax.tree.structure(abstract) == jax.tree.structure(state)  # no new weights
  return jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, tokens)


def test_extension_loads_the_trained_weights_and_changes_the_outputs():
  state = nnx.state(DecoderLM(CFG, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 32)
  trained = logits_with(CFG, state, tokens)
  stretched = logits_with(extend_rope(CFG, "yarn", 4.0, 8), state, tokens)
  assert float(jnp.abs(stretched - trained).max()) > 1e-3


@pytest.mark.parametrize("scheme", EXTENSIONS)
def test_each_extension_rotates_as_rope_at_factor_one_only(scheme):
  q = jax.random.normal(jax.random.key(0), (1, 24, 2, 8))
  pos = jnp.arange(24)[None]
  rope = positions.build("rope", 8, base=500.0)
  def rotated(factor):
    spec = dict(extend_rope(CFG, scheme, factor, 8).mixer[0]["position"])
    return positions.build(spec.pop("name"), 8, **spec).queries(q, pos)
  np.testing.assert_allclose(rotated(1.0), rope.queries(q, pos), rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(rotated(4.0) - rope.queries(q, pos)).max()) > 1e-3


def test_only_plain_rope_layers_change_and_keep_their_base():
  out = extend_rope(CFG, "yarn", 4, 64)
  assert out.mixer[1] == CFG.mixer[1]  # ALiBi untouched
  assert out.mixer[0]["position"] == {"name": "yarn", "base": 500.0, "factor": 4.0,
                                      "original_max_len": 64}
  assert extend_rope(LMConfig(mixer="attention"), "rope_linear", 2, 64).mixer["position"] == {
      "name": "rope_linear", "base": 10000.0, "factor": 2.0}  # the mixer's default rope
  assert extend_rope(CFG, "rope_ntk", 2, 64).n_layers == CFG.n_layers


@pytest.mark.parametrize("mixer", [
    "mamba", ALIBI, {"name": "attention", "position": {"name": "rope", "fraction": 0.5}}])
def test_no_plain_rope_layer_is_an_error(mixer):
  with pytest.raises(ConfigError, match="no layer of model.mixer"):
    extend_rope(LMConfig(mixer=mixer), "yarn", 2, 64)


def test_config_checks_eval_positions_when_built():
  base = ["train.eval_lengths=[1,2]"]
  with pytest.raises(ConfigError, match=r"train.eval_positions=\('pi',\) must be a list "
                     "of values one of rope_linear, rope_ntk, yarn"):
    configs.load([], [*base, "train.eval_positions=[pi]"])
  with pytest.raises(ConfigError, match="train.eval_lengths, which are empty"):
    configs.load([], ["train.eval_positions=[yarn]"])
  with pytest.raises(ConfigError, match="no layer of model.mixer"):
    configs.load([], [*base, "train.eval_positions=[yarn]", "model.mixer=gla"])
  cfg = configs.load([], [*base, "train.eval_positions=[yarn,rope_ntk]"])
  assert cfg.train.eval_positions == ("yarn", "rope_ntk")
