"""Dense attention: fast path vs einsum reference, GQA/MQA, kernel choice."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import mixers
from layers.kernels.attention import ATTENTION, reference
from layers.mixers.attention import KVCache


def rand(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1)])
def test_xla_kernel_matches_einsum_reference(heads, kv):
  q, k, v = rand(0, (2, 9, heads, 8)), rand(1, (2, 9, kv, 8)), rand(2, (2, 9, kv, 8))
  mask = jnp.tril(jnp.ones((9, 9), bool))[None, None]
  bias = rand(3, (1, heads, 9, 9))
  got = ATTENTION.impls["xla"].fn(q, k, v, mask, bias)
  np.testing.assert_allclose(got, reference(q, k, v, mask, bias), rtol=1e-5, atol=1e-5)


def test_reference_is_softmax_attention_written_out():
  q, k, v = rand(0, (1, 5, 2, 4)), rand(1, (1, 5, 1, 4)), rand(2, (1, 5, 1, 4))
  mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
  out = np.asarray(reference(q, k, v, mask))
  qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
  for h in range(2):
    for t in range(5):
      s = kn[0, :t + 1, 0] @ qn[0, t, h] / 2.0
      p = np.exp(s - s.max()); p /= p.sum()
      np.testing.assert_allclose(out[0, t, h], p @ vn[0, :t + 1, 0], rtol=1e-5, atol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads():
  m = mixers.build("attention", 32, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2)
  x = rand(4, (2, 7, 32))
  q, k, v = m.proj.q(x), m.proj.k(x), m.proj.v(x)
  mask = jnp.tril(jnp.ones((7, 7), bool))[None, None]
  rep = lambda a: jnp.repeat(a, 2, axis=2)
  np.testing.assert_allclose(reference(q, k, v, mask), reference(q, rep(k), rep(v), mask),
                             rtol=1e-5, atol=1e-6)


def test_auto_kernel_choice_is_logged_and_forced_kernels_decline_loudly(caplog):
  with caplog.at_level(logging.INFO, logger="mixerlab.kernels"):
    impl = ATTENTION.choose("auto", platform="gpu", dtype=jnp.float32, head_dim=64)
  assert impl.name == "xla"
  assert "cudnn: needs bf16/fp16" in caplog.text
  assert ATTENTION.choose("auto", platform="gpu", dtype=jnp.bfloat16, head_dim=64).name == "cudnn"
  with pytest.raises(ValueError, match="needs a GPU"):
    ATTENTION.choose("cudnn", platform="cpu", dtype=jnp.bfloat16, head_dim=64)
  with pytest.raises(ValueError, match="one of"):
    mixers.build("attention", 32, rngs=nnx.Rngs(0), kernel="flash")


def test_forced_reference_kernel_gives_same_mixer_output():
  x = rand(5, (2, 10, 32))
  a = mixers.build("attention", 32, rngs=nnx.Rngs(0), num_kv_heads=1)
  b = mixers.build("attention", 32, rngs=nnx.Rngs(0), num_kv_heads=1, kernel="reference")
  np.testing.assert_allclose(a(x), b(x), rtol=1e-5, atol=1e-6)


def test_bad_head_counts_are_refused():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    mixers.build("attention", 32, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="not divisible"):
    mixers.build("attention", 30, rngs=nnx.Rngs(0), num_heads=4)


def test_cache_is_a_pytree_that_jits_and_shards():
  m = mixers.build("attention", 32, rngs=nnx.Rngs(0))
  cache = m.init_cache(2, 8)
  assert isinstance(cache, KVCache) and len(jax.tree.leaves(cache)) == 3
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = jax.device_put(cache, KVCache(spec, spec, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec())))
  y, new = nnx.jit(lambda m, x, c: m(x, cache=c))(m, rand(6, (2, 3, 32)), sharded)
  assert int(new.pos) == 3 and y.shape == (2, 3, 32)


def test_traced_overflow_poisons_outputs_instead_of_wrapping():
  m = mixers.build("attention", 32, rngs=nnx.Rngs(0))
  step = nnx.jit(lambda m, x, c: m(x, cache=c))
  cache = m.init_cache(1, 4)
  _, cache = step(m, rand(7, (1, 3, 32)), cache)
  y, _ = step(m, rand(8, (1, 3, 32)), cache)  # 3 + 3 > 4, position traced
  assert np.isnan(np.asarray(y)).all()
