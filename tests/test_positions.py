"""Position schemes: relative-position property of the rotary family,
interpolation identities, ALiBi slopes, and every scheme inside attention
passing the causal and incremental contract checks."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixer_contract as mc
from layers import mixers, positions

ROTARY = ["rope", "rope_linear", "rope_ntk", "yarn", "rope_llama3"]


def rand(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("name", ROTARY)
def test_rotary_scores_depend_only_on_distance(name):
  p = positions.build(name, 16)
  q, k = rand(0, (1, 1, 1, 16)), rand(1, (1, 1, 1, 16))
  def score(m, n):
    pm, pn = jnp.full((1, 1), m), jnp.full((1, 1), n)
    return float(jnp.sum(p.queries(q, pm) * p.keys(k, pn)))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4, abs=1e-5)
  assert score(7, 3) != pytest.approx(score(9, 3), rel=1e-3)


def test_linear_interpolation_is_rope_at_scaled_positions():
  base, pi = positions.build("rope", 16), positions.build("rope_linear", 16, factor=4.0)
  q = rand(2, (1, 3, 2, 16))
  pos = jnp.asarray([[0, 8, 20]])
  np.testing.assert_allclose(pi.queries(q, pos), base.queries(q, pos // 4), atol=1e-5)


def test_ntk_keeps_highest_frequency_and_stretches_lowest():
  d, f = 64, 8.0
  rope = positions.build("rope", d).inv_freq()
  ntk = positions.build("rope_ntk", d, factor=f).inv_freq()
  assert float(ntk[0]) == pytest.approx(float(rope[0]))
  assert float(rope[-1] / ntk[-1]) == pytest.approx(f, rel=0.05)


def test_yarn_blends_between_extrapolation_and_interpolation():
  y = positions.build("yarn", 64, factor=4.0, original_max_len=2048)
  rope = positions.build("rope", 64).inv_freq()
  ratio = np.asarray(rope / y.inv_freq())
  assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(4.0)
  assert np.all(np.diff(ratio) >= -1e-6)
  assert y.mscale == pytest.approx(0.1 * math.log(4.0) + 1)


def test_alibi_slopes_follow_the_paper():
  np.testing.assert_allclose(positions.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
  # Not a power of two: the 4 slopes of n=4, then every other slope of n=8.
  s6 = np.asarray(positions.alibi_slopes(6))
  np.testing.assert_allclose(s6, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
  b = positions.build("alibi", 8, num_heads=8).bias(jnp.asarray([[0, 1, 2]]),
                                                    jnp.asarray([[0, 1, 2]]))
  assert b.shape == (1, 8, 3, 3) and float(b[0, 0, 2, 0]) == pytest.approx(-2 * 0.5)


@pytest.mark.parametrize("spec", ["none", "alibi", {"name": "rope", "base": 500.0},
                                  {"name": "yarn", "factor": 2.0, "original_max_len": 8}])
def test_attention_with_each_scheme_keeps_the_contract(spec):
  make = lambda seed: mixers.build("attention", mc.D_MODEL, rngs=nnx.Rngs(seed),
                                   position=spec)
  mc.check_causal(make, seeds=(0,), ts=(5,))
  mc.check_incremental(make, cuts=([4, 1, 1, 5, 5],))
  mc.check_packed(make)


def test_bad_position_specs_are_named():
  with pytest.raises(ValueError, match="rope"):
    mixers.build("attention", 32, rngs=nnx.Rngs(0), position="ropee")
  with pytest.raises(TypeError, match="factor"):
    mixers.build("attention", 32, rngs=nnx.Rngs(0),
                 position={"name": "rope_linear", "factor": "2"})
  with pytest.raises(ValueError, match=">= 1"):
    positions.build("yarn", 16, factor=0.5)
