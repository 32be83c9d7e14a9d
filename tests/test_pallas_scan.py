"""Pallas linear-scan kernels against the pure-JAX `sequential` form.

TPU kernels run in TPU interpret mode (`pltpu.InterpretParams`), GPU
kernels in Mosaic GPU interpret mode; both are lowered for their platform
with `jax.export`. Tolerance
1e-5 relative (in norm): everything is fp32, and the kernels' block-wise
associative scan only reorders the products.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.kernels.linear_recurrence import sequential
from layers.kernels.pallas import scan_gpu, scan_tpu
from mixer_contract import rel_err
from test_pallas_linear import GPU, TPU, compile_and_run, needs_gpu_interpret

TOL = 1e-5


def inputs(B=2, L=150, C=12, seed=0):
  """L = 150 is not a multiple of the 128-step block."""
  rng = np.random.default_rng(seed)
  a = rng.uniform(0.5, 1.0, (B, L, C))
  b, h0 = rng.standard_normal((B, L, C)), rng.standard_normal((B, C))
  return tuple(jnp.asarray(x, jnp.float32) for x in (a, b, h0))


def outputs_and_grads(fn, args):
  a, b, h0 = args
  rng = np.random.default_rng(1)
  w_h = jnp.asarray(rng.standard_normal(a.shape), jnp.float32)
  w_last = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)

  def loss(a, b, h0):
    h, last = fn(a, b, h0)
    return jnp.sum(h * w_h) + jnp.sum(last * w_last), (h, last)

  return compile_and_run(jax.grad(loss, argnums=range(3), has_aux=True), *args)


def errors(fn, args):
  got = jax.tree.leaves(outputs_and_grads(fn, args))
  want = jax.tree.leaves(outputs_and_grads(sequential, args))
  return [rel_err(x, y) for x, y in zip(got, want)]


KERNELS = {"tpu": (scan_tpu, TPU), "gpu": (scan_gpu, GPU)}
PARAMS = [pytest.param("tpu"), pytest.param("gpu", marks=needs_gpu_interpret)]
CUSTOM_CALL = {"tpu": "tpu_custom_call", "gpu": "mosaic_gpu"}


def interpreted(platform):
  module, params = KERNELS[platform]
  return lambda a, b, h0: module.linear_recurrence(a, b, h0, interpret=params)


@pytest.mark.parametrize("platform", PARAMS)
def test_matches_sequential(platform):
  errs = errors(interpreted(platform), inputs())
  assert max(errs) < TOL, errs


def _tpu_block_scan_without_decay(a, b, reverse):
  """Planted bug: the block's products of a are dropped (h_t = a_t h_in + B_t)."""
  return a, _real_tpu_block_scan(a, b, reverse)[1]


_real_tpu_block_scan = scan_tpu._block_scan


def test_tpu_planted_bug_is_caught(monkeypatch):
  monkeypatch.setattr(scan_tpu, "_block_scan", _tpu_block_scan_without_decay)
  errs = errors(interpreted("tpu"), inputs())
  assert max(errs) > 100 * TOL, errs


@needs_gpu_interpret
def test_gpu_planted_bug_is_caught(monkeypatch):
  monkeypatch.setattr(scan_gpu, "_update", lambda a_t, b_t, h: h + b_t)
  errs = errors(interpreted("gpu"), inputs())
  assert max(errs) > 100 * TOL, errs


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_lowers(platform):
  module, _ = KERNELS[platform]
  a, b, h0 = inputs()
  loss = lambda a, b, h0: sum(jnp.sum(x) for x in module.linear_recurrence(a, b, h0))
  exported = jax.export.export(jax.jit(jax.value_and_grad(loss, range(3))),
                               platforms=[{"gpu": "cuda"}.get(platform, platform)])(a, b, h0)
  assert exported.mlir_module().count(CUSTOM_CALL[platform]) >= 2


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_declines(platform):
  declines = KERNELS[platform][0].declines
  assert declines(platform=platform, dtype=jnp.float32) is None
  assert "complex64" in declines(platform=platform, dtype=jnp.complex64)
  assert "dtype" in declines(platform=platform)
  assert f"runs on {platform}" in declines(platform="cpu", dtype=jnp.float32)
  with pytest.raises(ValueError, match="real"):
    a, b, h0 = inputs(L=8)
    KERNELS[platform][0].linear_recurrence(a.astype(jnp.complex64), b, h0)
