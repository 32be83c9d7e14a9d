"""Pallas linear-scan kernels against the pure-JAX `sequential` forms: the
diagonal linear recurrence and Mamba's fused selective scan.

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
from layers.kernels.pallas import scan_gpu, scan_selective_gpu, scan_tpu
from layers.kernels.selective_scan import s6_sequential
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


# -- the fused selective scan (GPU) -------------------------------------------

def s6_inputs(seed=0):
  """L = 40 is not a multiple of the 16-step block, D = 12 of the 128
  channels, d_state 3 of 4; row 0 resets at step 17, row 1 never."""
  rng = np.random.default_rng(seed)
  B, L, D, N = 2, 40, 12, 3
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  x, Bm, Cm, h0 = f(B, L, D), f(B, L, N), f(B, L, N), f(B, D, N)
  dt = jnp.asarray(rng.uniform(0.01, 0.5, (B, L, D)), jnp.float32)
  A = -jnp.asarray(rng.uniform(0.5, 2.0, (D, N)), jnp.float32)
  reset = jnp.asarray(np.arange(L)[None] == np.array([[17], [L]]))
  return (x, dt, A, Bm, Cm, h0), reset


def s6_errors(fn):
  """y, the final state, and the gradients for x, dt, A, B, C and h0."""
  args, reset = s6_inputs()
  rng = np.random.default_rng(1)
  w_y = jnp.asarray(rng.standard_normal(args[0].shape), jnp.float32)
  w_h = jnp.asarray(rng.standard_normal(args[5].shape), jnp.float32)

  def run(fn):
    def loss(x, dt, A, Bm, Cm, h0):
      y, h = fn(x, dt, A, Bm, Cm, h0=h0, reset_BxL=reset)
      return jnp.sum(y * w_y) + jnp.sum(h * w_h), (y, h)
    grad = jax.grad(loss, argnums=range(6), has_aux=True)
    return jax.tree.leaves(compile_and_run(grad, *args))

  return [rel_err(a, b) for a, b in zip(run(fn), run(s6_sequential))]


gpu_s6 = lambda *a, **k: scan_selective_gpu.selective_scan(*a, **k, interpret=GPU)


@needs_gpu_interpret
def test_gpu_selective_scan_matches_sequential():
  errs = s6_errors(gpu_s6)
  assert max(errs) < TOL, errs


_real_state_before = scan_selective_gpu._state_before


@needs_gpu_interpret
@pytest.mark.parametrize("name, plant", [
    # both kernels: resets ignored
    ("_decays", lambda dt_t, A, keep: [jnp.exp(dt_t * A_n) for A_n in A]),
    # backward kernel: h_t taken for h_{t-1}
    ("_state_before", lambda hs_s, h_s, t, n: hs_s[t, n])])
def test_gpu_selective_scan_planted_bug_is_caught(monkeypatch, name, plant):
  monkeypatch.setattr(scan_selective_gpu, name, plant)
  errs = s6_errors(gpu_s6)
  assert max(errs) > 100 * TOL, errs


def test_gpu_selective_scan_lowers():
  args, reset = s6_inputs()

  def loss(*args):
    y, h = scan_selective_gpu.selective_scan(*args[:5], h0=args[5],
                                             reset_BxL=reset)
    return jnp.sum(y) + jnp.sum(h)

  exported = jax.export.export(jax.jit(jax.value_and_grad(loss, range(6))),
                               platforms=["cuda"])(*args)
  assert exported.mlir_module().count("custom_call @mosaic_gpu") >= 2


def test_gpu_selective_scan_declines():
  declines = scan_selective_gpu.declines
  assert declines(platform="gpu", dtype=jnp.float32, d_state=16) is None
  assert "d_state 64" in declines(platform="gpu", dtype=jnp.float32, d_state=64)
  assert "d_state" in declines(platform="gpu", dtype=jnp.float32)
  assert "runs on gpu" in declines(platform="tpu", dtype=jnp.float32, d_state=16)
  (x, dt, A, Bm, Cm, h0), _ = s6_inputs()
  with pytest.raises(ValueError, match="d_state must be at most 16"):
    scan_selective_gpu.selective_scan(x, dt, jnp.zeros((12, 17)), Bm, Cm)
