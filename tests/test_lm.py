"""Decoder LM: initial loss, overfitting, cached generation, axis names."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from arches.generate import _generate, generate
from arches.lm import DecoderLM, LMConfig, cross_entropy
from layers.params import AXES, logical_axes

TINY = dict(vocab_size=64, d_model=32, n_layers=2)


def tokens(seed, shape=(4, 24), vocab=64):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def test_initial_loss_is_about_log_vocab():
  m = DecoderLM(LMConfig(**TINY), rngs=nnx.Rngs(0))
  t = tokens(0)
  loss = cross_entropy(m(t)[:, :-1], t[:, 1:])
  assert abs(float(loss) - math.log(64)) < 0.25


def test_overfits_fixed_batch():
  m = DecoderLM(LMConfig(**TINY), rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(m, optax.adam(3e-3), wrt=nnx.Param)
  t = tokens(1, (2, 16))

  @nnx.jit
  def step(m, opt):
    loss, g = nnx.value_and_grad(lambda m: cross_entropy(m(t)[:, :-1], t[:, 1:]))(m)
    opt.update(m, g)
    return loss

  losses = [float(step(m, opt)) for _ in range(150)]
  assert losses[-1] < 0.1 * losses[0], losses[::30]


@pytest.mark.parametrize("mixer", ["attention", ["attention", {"name": "attention",
                                                                "num_kv_heads": 1}]])
def test_cached_greedy_generation_equals_repeated_full_forward(mixer):
  m = DecoderLM(LMConfig(**TINY, mixer=mixer), rngs=nnx.Rngs(3))
  prompt = tokens(2, (2, 5))
  out = generate(m, prompt, max_new_tokens=6)
  # Repeated full forward passes over a fixed-length buffer: the model is
  # causal, so the unfilled tail cannot change the logits read at t, and one
  # compiled program serves every step.
  forward = nnx.jit(lambda m, s: m(s))
  seq = jnp.concatenate([prompt, jnp.zeros((2, 6), jnp.int32)], axis=1)
  for t in range(5, 11):
    nxt = jnp.argmax(forward(m, seq)[:, t - 1], -1).astype(jnp.int32)
    seq = seq.at[:, t].set(nxt)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(seq[:, 5:]))


def test_generation_compiles_once_and_samples():
  m = DecoderLM(LMConfig(**TINY), rngs=nnx.Rngs(0))
  prompt = tokens(3, (2, 4))
  before = _generate._cache_size()
  a = generate(m, prompt, max_new_tokens=8, key=jax.random.key(1), temperature=1.0, top_k=5)
  b = generate(m, prompt, max_new_tokens=8, key=jax.random.key(2), temperature=0.7, top_k=5)
  assert _generate._cache_size() == before + 1  # temperature is traced, not static
  assert a.shape == (2, 8) and not np.array_equal(np.asarray(a), np.asarray(b))
  # A temperature of 0 is greedy whatever the key.
  g1 = generate(m, prompt, max_new_tokens=8, key=jax.random.key(1), top_k=5)
  g2 = generate(m, prompt, max_new_tokens=8, key=jax.random.key(2), top_k=5)
  np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
  assert _generate._cache_size() == before + 1


def test_generation_refuses_too_small_cache():
  m = DecoderLM(LMConfig(**TINY), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_len"):
    generate(m, tokens(0, (1, 8)), max_new_tokens=8, max_len=10)


def test_every_parameter_has_logical_axes():
  m = DecoderLM(LMConfig(**TINY, tie_embeddings=False), rngs=nnx.Rngs(0))
  axes = jax.tree.leaves(logical_axes(m), is_leaf=lambda x: isinstance(x, tuple))
  params = jax.tree.leaves(nnx.state(m, nnx.Param))
  assert len(axes) == len(params)
  for a, p in zip(axes, params):
    assert len(a) == p.ndim and all(n is None or n in AXES for n in a)


def test_hybrid_pattern_cycles_over_depth():
  cfg = LMConfig(**{**TINY, "n_layers": 5},
                 mixer=["attention", {"name": "attention", "num_heads": 2}])
  m = DecoderLM(cfg, rngs=nnx.Rngs(0))
  assert [b.mixer.num_heads for b in m.blocks] == [4, 2, 4, 2, 4]


def test_bad_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="attention"):
    LMConfig(mixer="atention")
  with pytest.raises(ValueError, match="num_heads"):
    LMConfig(mixer={"name": "attention", "num_heads": "4"})
  with pytest.raises(ValueError, match="swiglu"):
    LMConfig(channel="swiglo")
  with pytest.raises(ValueError, match="n_layers"):
    LMConfig(n_layers=0)


def test_bf16_compute_keeps_fp32_params_and_logits():
  m = DecoderLM(LMConfig(**TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))
  out = m(tokens(0))
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_reports_params_and_flops():
  m = DecoderLM(LMConfig(**TINY), rngs=nnx.Rngs(0))
  n = m.num_params()
  assert n == sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  # Dense attention: FLOPs per token grow with context; ~2 * params at short context.
  assert m.flops_per_token(1024) > m.flops_per_token(16) > 0
