"""Dense attention: the einsum oracle, kernel choice and cuDNN declines, the
mixer against its forced oracle, and no length-squared array in the mixer."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import mixers, positions
from layers.kernels.attention import ATTENTION, reference
from layers.blocks.attention import KVCache


def rand(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def test_reference_is_softmax_attention_written_out():
  """The oracle against a loop transcription of the signature's semantics:
  positions from q_offset, causal, window, segments, soft-cap, ALiBi."""
  B, T, S, H, K, off, window, cap = 2, 5, 9, 2, 4, 3, 4, 1.5
  q, k, v = rand(0, (B, T, H, K)), rand(1, (B, S, 1, K)), rand(2, (B, S, 1, K))
  q_seg = jnp.asarray([[0, 0, 1, 1, 1], [0, 0, 0, 0, 2]], jnp.int32)  # 2: no key
  kv_seg = jnp.asarray([[0] * 5 + [1] * 4, [0] * 9], jnp.int32)
  slopes = jnp.asarray([0.25, 0.5])
  out = np.asarray(reference(q, k, v, q_offset=off, window=window,
                             q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                             alibi_slopes=slopes, softcap=cap))
  qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
  for b in range(B):
    for h in range(H):
      for t in range(T):
        i = off + t
        js = [j for j in range(S) if i - window < j <= i
              and q_seg[b, t] == kv_seg[b, j]]
        s = np.array([cap * np.tanh(qn[b, t, h] @ kn[b, j, 0] / 2.0 / cap)
                      - float(slopes[h]) * (i - j) for j in js])
        p = np.exp(s - s.max()) if js else s
        want = p @ vn[b, js, 0] / p.sum() if js else np.zeros(K)
        np.testing.assert_allclose(out[b, t, h], want, rtol=1e-5, atol=1e-6)
  # Row 0's query 2 (segment 1, position 5) sees key 5 alone.
  np.testing.assert_allclose(out[0, 2, 0], vn[0, 5, 0], rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
  m = mixers.build("attention", 32, rngs=nnx.Rngs(0), num_heads=4, num_kv_heads=2)
  x = rand(4, (2, 7, 32))
  q, k, v = m.proj.q(x), m.proj.k(x), m.proj.v(x)
  rep = lambda a: jnp.repeat(a, 2, axis=2)
  np.testing.assert_allclose(reference(q, k, v), reference(q, rep(k), rep(v)),
                             rtol=1e-5, atol=1e-6)


PLAIN = dict(q_len=64, kv_len=64, causal=True, q_offset=0, window=None,
             segments=False, alibi=False, softcap=False)


def test_auto_kernel_choice_is_logged_and_forced_kernels_decline_loudly(caplog):
  with caplog.at_level(logging.INFO, logger="mixerlab.kernels"):
    impl = ATTENTION.choose("auto", platform="gpu", dtype=jnp.float32,
                            head_dim=64, **PLAIN)
  assert impl.name == "blockwise"
  assert "cudnn: needs bf16/fp16" in caplog.text
  gpu_bf16 = dict(platform="gpu", dtype=jnp.bfloat16, head_dim=64)
  assert ATTENTION.choose("auto", **gpu_bf16, **PLAIN).name == "cudnn"
  assert ATTENTION.choose("auto", platform="cpu", dtype=jnp.bfloat16,
                          head_dim=64, **PLAIN).name == "blockwise"
  with pytest.raises(ValueError, match="needs a GPU"):
    ATTENTION.choose("cudnn", platform="cpu", dtype=jnp.bfloat16, head_dim=64,
                     **PLAIN)
  with pytest.raises(ValueError, match="segment ids"):
    ATTENTION.choose("cudnn", **gpu_bf16, **{**PLAIN, "segments": True})
  with pytest.raises(ValueError, match="one of"):
    mixers.build("attention", 32, rngs=nnx.Rngs(0), kernel="flash")


@pytest.mark.parametrize("change,reason", [
    ({}, None),
    ({"window": 16}, None),
    ({"causal": False, "kv_len": 80}, None),
    ({"q_len": 1, "q_offset": None}, None),  # one-token decode: a key length
    ({"head_dim": 12}, "multiple of 8"),
    ({"alibi": True}, "ALiBi"),
    ({"softcap": True}, "soft-cap"),
    ({"q_len": 4, "q_offset": None}, "q_offset traced"),
    ({"q_len": 4, "q_offset": 60}, "q_offset 60"),
    ({"q_len": 1, "q_offset": None, "window": 8}, "q_offset traced"),
    ({"kv_len": 80}, "q_len == kv_len"),
    ({"causal": False, "window": 8}, "unbounded on the right"),
])
def test_cudnn_runs_only_what_it_can_express_without_a_mask(change, reason):
  facts = {**PLAIN, "platform": "gpu", "dtype": jnp.bfloat16, "head_dim": 64,
           **change}
  got = ATTENTION.impls["cudnn"].declines(**facts)
  assert got is None if reason is None else reason in got, got


def test_cudnn_refuses_a_direct_call_it_cannot_express():
  q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="'cudnn' cannot run this call: ALiBi"):
    ATTENTION.impls["cudnn"].fn(q, q, q, alibi_slopes=jnp.ones(2))


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_forced_reference_kernel_gives_same_mixer_output(position):
  """Full, packed and incremental calls, blockwise (auto on CPU) vs oracle."""
  x = rand(5, (2, 10, 32))
  seg = jnp.asarray([[0] * 3 + [1] * 7, [0] * 10], jnp.int32)

  @nnx.jit
  def calls(m):
    _, cache = m(x[:, :4], cache=m.init_cache(2, 12))
    return m(x), m(x, segment_ids=seg), m(x[:, 4:6], cache=cache)[0]

  make = lambda kernel: mixers.build("attention", 32, rngs=nnx.Rngs(0),
                                     num_kv_heads=1, position=position,
                                     kernel=kernel)
  for a, b in zip(calls(make("auto")), calls(make("reference"))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _largest_array(fn, *args):
  """Elements of the largest value any equation of fn's jaxpr produces,
  inside loop and call bodies too."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        yield int(np.prod(var.aval.shape))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            yield from walk(sub)
  return max(walk(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_mixer_builds_no_length_squared_array(kernel):
  """Full, packed and incremental calls stay below a [T, S] array (several
  times the kernel's score block); the forced oracle shows the check bites."""
  L = 1100
  m = mixers.build("attention", 32, rngs=nnx.Rngs(0), kernel=kernel,
                   position="alibi")
  x = jnp.zeros((1, L, 32))
  seg = jnp.zeros((1, L), jnp.int32)
  cache = m.init_cache(1, L)
  sizes = {"full": _largest_array(lambda x: m(x), x),
           "packed": _largest_array(lambda x: m(x, segment_ids=seg), x),
           "incremental": _largest_array(lambda x: m(x, cache=cache),
                                         x[:, :L // 2])}
  limits = {"full": L * L, "packed": L * L, "incremental": L // 2 * L}
  small = {k: sizes[k] < limits[k] for k in sizes}
  assert all(small.values()) == (kernel == "auto"), (sizes, limits)


def test_a_position_bias_the_kernels_cannot_take_is_refused(monkeypatch):
  # "none" given a bias that is not linear in distance (and so no slopes).
  monkeypatch.setattr(positions.NoPE, "distance_bias", lambda self, d: -d * d)
  with pytest.raises(ValueError, match="'none' adds a score bias"):
    mixers.build("attention", 32, rngs=nnx.Rngs(0), position="none")


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
