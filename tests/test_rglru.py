"""Griffin's RG-LRU block: recurrence forms agree, the mixer matches the
paper's equations written as a naive float64 loop, bounded sqrt gradient,
option errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import mixers
from layers.kernels.linear_recurrence import associative, sequential
from layers.mixers.rglru import MAX_SQRT_GRADIENT, sqrt_bounded_grad
from mixer_contract import rel_err

B, L, D = 2, 11, 32  # D as in the contract suite, so inits compile once


def test_recurrence_forms_match_loop():
  rng = np.random.default_rng(0)
  a = rng.uniform(0.5, 1.0, (B, L, 3))
  b = rng.standard_normal((B, L, 3))
  h0 = rng.standard_normal((B, 3))
  h, ref = h0, []
  for t in range(L):
    h = a[:, t] * h + b[:, t]
    ref.append(h)
  ref = np.stack(ref, 1)
  h0 = jnp.asarray(h0, jnp.float32)
  for fn in (associative, sequential):
    hs, last = jax.jit(fn)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), h0)
    assert rel_err(hs, ref) < 1e-5 and rel_err(last, ref[:, -1]) < 1e-5


def sigmoid(z):
  return 1 / (1 + np.exp(-z))


def gelu_tanh(z):
  return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


def naive_block(p, x):
  """Griffin recurrent block, token by token, float64."""
  dense = lambda z, q: z @ q["kernel"] + q["bias"]
  gate = gelu_tanh(dense(x, p["gate_proj"]))
  u = dense(x, p["in_proj"])
  K, W = p["conv"]["weight"].shape
  H = p["input_gate"]["w"].shape[0]
  blocks = lambda z, q: (np.einsum("bhi,hij->bhj", z.reshape(z.shape[0], H, -1), q["w"])
                         + q["b"]).reshape(z.shape)
  h = np.zeros((x.shape[0], W))
  out = []
  for t in range(x.shape[1]):
    conv = p["conv"]["bias"] + sum(p["conv"]["weight"][K - 1 - j] * u[:, t - j]
                             for j in range(K) if t - j >= 0)
    r, i = sigmoid(blocks(conv, p["a_gate"])), sigmoid(blocks(conv, p["input_gate"]))
    a = sigmoid(-p["a_param"]) ** (8 * r)  # a_t = sigma(Lambda)^(c r_t)
    norm = 1.0 if t == 0 else np.sqrt(1 - a ** 2)
    h = a * h + norm * (i * conv)
    out.append(h * gate[:, t])
  return np.stack(out, 1) @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]


def test_rglru_block_matches_naive_equations_in_both_forms():
  m = mixers.build("rglru", D, rngs=nnx.Rngs(0))
  p = jax.tree.map(lambda v: np.asarray(v, np.float64),
                   nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  # Non-zero biases and a wide spread of gates, so every term matters.
  rng = np.random.default_rng(1)
  for q in (p["gate_proj"], p["in_proj"], p["out_proj"]):
    q["bias"] = 0.3 * rng.standard_normal(q["bias"].shape)
  for q in (p["input_gate"], p["a_gate"]):
    q["w"], q["b"] = 20 * q["w"], 0.3 * rng.standard_normal(q["b"].shape)
  p["conv"]["bias"] = 0.3 * rng.standard_normal(p["conv"]["bias"].shape)
  nnx.update(m, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), p))
  x = rng.standard_normal((B, L, D))
  ref = naive_block(p, x)
  run = nnx.jit(lambda m, x: m(x))
  for kernel in ("associative", "sequential"):
    m.kernel = kernel
    assert rel_err(run(m, jnp.asarray(x, jnp.float32)), ref) < 1e-5, kernel


def test_sqrt_gradient_is_bounded():
  g = jax.grad(lambda x: sqrt_bounded_grad(x).sum())(jnp.array([0.0, 1e-12, 0.25]))
  np.testing.assert_allclose(g, [MAX_SQRT_GRADIENT, MAX_SQRT_GRADIENT, 1.0], rtol=1e-6)
  np.testing.assert_allclose(sqrt_bounded_grad(jnp.array([0.25])), [0.5])


@pytest.mark.parametrize("options,match", [
    ({"num_heads": 5}, "multiple of num_heads"),
    ({"width": 0}, "multiple of num_heads"),
    ({"conv_width": 0}, "conv_width"),
    ({"kernel": "pallas"}, "unknown linear_recurrence kernel"),
])
def test_bad_options(options, match):
  with pytest.raises(ValueError, match=match):
    mixers.build("rglru", D, rngs=nnx.Rngs(0), **options)
