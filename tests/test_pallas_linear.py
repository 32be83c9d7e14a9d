"""Pallas chunked linear attention against the pure-JAX `chunked` form.

TPU kernels run in TPU interpret mode (`pltpu.InterpretParams`: VMEM and
DMA simulated on CPU), GPU kernels in Mosaic GPU interpret mode (shared
memory, barriers and TMA simulated). Every kernel is also lowered for its
platform with `jax.export`, and planted bugs show that the equality checks
fail.

Tolerances: fp32 1e-5 (relative, in norm), the pure-JAX form computing in
fp32 too; bf16 3e-2 for outputs and gradients (matmul operands, the state
read by the queries included, are rounded to bf16 in the kernels, not in
the reference; the errors seen are 1e-3 to 4e-3).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jax.experimental.pallas.tpu as pltpu

from layers.kernels.linear_attention import chunked
from layers.kernels.pallas import linear_attention_gpu as gpu_la
from layers.kernels.pallas import linear_attention_tpu as tpu_la
from mixer_contract import rel_err


@dataclasses.dataclass(frozen=True)
class Case:
  B: int
  L: int
  H: int
  Hk: int
  K: int
  V: int
  chunk: int
  decay: str     # "channel", or "scalar" (batch row 0 undecayed, row 1 strong)
  segments: tuple  # per batch row: lengths of its segments
  dtype: str = "float32"


# Length 40 is not a chunk multiple; GQA (2 query heads, 1 key/value head);
# three segments, one starting mid-chunk and one mid-sub-chunk.
CHANNEL = Case(1, 40, 2, 1, 8, 8, 32, "channel", ((7, 20, 13),))
# One head; row 0 without decay, row 1 with log decay -5 per step; row 1's
# second segment starts exactly at a chunk boundary.
SCALAR = Case(2, 32, 1, 1, 8, 4, 16, "scalar", ((32,), (16, 16)))
BF16 = dataclasses.replace(CHANNEL, dtype="bfloat16")
# The GPU kernel's chunk is one 64-row wgmma tile, its operands 16-bit and
# its head dims 64 or 128: the same situations at those sizes (L = 100).
GPU_CHANNEL = Case(1, 100, 2, 1, 64, 64, 64, "channel", ((30, 70),), "bfloat16")
GPU_SCALAR = Case(2, 100, 1, 1, 64, 64, 64, "scalar", ((100,), (64, 36)),
                  "bfloat16")
TOL = {"float32": 1e-5, "bfloat16": 3e-2}


def inputs(case: Case, seed=0):
  rng = np.random.default_rng(seed)
  c = case
  rand = lambda *s: rng.standard_normal(s).astype(np.float32)
  q, k = rand(c.B, c.L, c.H, c.K), rand(c.B, c.L, c.Hk, c.K)
  v, s0 = rand(c.B, c.L, c.Hk, c.V), rand(c.B, c.H, c.K, c.V)
  if c.decay == "channel":  # half the channels strong (-4..-6 per step)
    half = c.K // 2
    g = np.concatenate([-rng.uniform(4, 6, (c.B, c.L, c.H, half)),
                        -rng.uniform(0, 0.2, (c.B, c.L, c.H, c.K - half))], -1)
  else:
    g = np.stack([np.zeros((c.L, c.H, 1)),
                  np.full((c.L, c.H, 1), -5.0)])[:c.B]
  seg = np.stack([np.repeat(np.arange(len(r)), r) for r in c.segments])
  dt = jnp.dtype(c.dtype)
  return (jnp.asarray(q, dt), jnp.asarray(k, dt), jnp.asarray(v, dt),
          jnp.asarray(g, jnp.float32), jnp.asarray(seg, jnp.int32),
          jnp.asarray(s0))


def reference(q, k, v, g, seg, s0, *, chunk_size):
  """The pure-JAX chunked form, key/value heads repeated for GQA. Its chunk
  is 16 whatever the kernel's: the result does not depend on it, and on
  jaxlib 0.10.2 under this suite's XLA flags the gradient of its two-sub-
  chunk form (chunk 32) at the CHANNEL case crashes XLA's CPU backend."""
  del chunk_size
  group = q.shape[2] // k.shape[2]
  rep = lambda x: jnp.repeat(x, group, axis=2)
  return chunked(q, rep(k), rep(v), g, seg, s0, chunk_size=16)


# Interpret mode runs each kernel as a large XLA program; compiling it
# without XLA's backend optimizations halves the compile time here.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_and_run(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _gpu_interpret_params():
  """Mosaic GPU interpret mode (shared memory, barriers and asynchronous
  copies simulated on CPU); not exported publicly in jax 0.10.2."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError:
    return None
  return InterpretGPUParams()


TPU = pltpu.InterpretParams()
GPU = _gpu_interpret_params()
needs_gpu_interpret = pytest.mark.skipif(
    GPU is None, reason="this jax has no Mosaic GPU interpret mode")


def outputs_and_grads(fn, case: Case, args, grads: bool):
  """(o, final state) and, if `grads`, the gradients of a random projection
  of both with respect to q, k, v, log_decay and the initial state."""
  q, k, v, g, seg, s0 = args
  rng = np.random.default_rng(1)
  w_o = jnp.asarray(rng.standard_normal((case.B, case.L, case.H, case.V)),
                    jnp.float32)
  w_s = jnp.asarray(rng.standard_normal(s0.shape), jnp.float32)

  def loss(q, k, v, g, s0):
    o, s = fn(q, k, v, g, seg, s0, chunk_size=case.chunk)
    return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s), (o, s)

  if not grads:
    return compile_and_run(lambda *a: loss(*a)[1], q, k, v, g, s0)
  return compile_and_run(jax.grad(loss, argnums=range(5), has_aux=True),
                          q, k, v, g, s0)


def errors(kernel_fn, case: Case, grads=True, **kw):
  """Relative errors of the kernel against the reference: o, final state,
  then (if `grads`) d q, k, v, log_decay, initial state."""
  args = inputs(case)
  run = lambda fn: jax.tree.leaves(outputs_and_grads(fn, case, args, grads))
  got = run(lambda *a, **k: kernel_fn(*a, **k, **kw))
  want = run(reference)
  assert all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in got)
  return [rel_err(a.astype(jnp.float32), b.astype(jnp.float32))
          for a, b in zip(got, want)]


@pytest.mark.parametrize("case", [CHANNEL, SCALAR, BF16],
                         ids=["channel", "scalar", "bf16"])
def test_tpu_matches_reference(case):
  errs = errors(tpu_la.linear_attention, case, interpret=TPU)
  assert max(errs) < TOL[case.dtype], errs


@needs_gpu_interpret
@pytest.mark.parametrize("case", [GPU_CHANNEL, GPU_SCALAR],
                         ids=["channel", "scalar"])
def test_gpu_matches_reference(case):
  errs = errors(gpu_la.linear_attention, case, interpret=GPU)
  assert max(errs) < TOL[case.dtype], errs


# -- planted bugs: each makes the equality check above fail -----------------

# The real helpers, called with the decay zeroed: the planted versions.
_REAL = {(m, n): getattr(m, n) for m in (tpu_la, gpu_la)
         for n in ("_q_scale", "_carry")}


def _without_decay(module, name):
  real = _REAL[module, name]
  return lambda b, *rest: real(0 * b, *rest)


def _tpu_mask_off_by_one(start_Cx1):  # output pass: query t sees key t + 1
  C = start_Cx1.shape[0]
  t, s = (jax.lax.broadcasted_iota(jnp.int32, (C, C), a) for a in (0, 1))
  return (s <= t + 1) & (s >= start_Cx1)


def _tpu_mask_t_off_by_one(start_1xC):  # gradient pass: dk misses a query
  C = start_1xC.shape[1]
  s, t = (jax.lax.broadcasted_iota(jnp.int32, (C, C), a) for a in (0, 1))
  return (s < t) & (s >= start_1xC)


def _gpu_mask_t_off_by_one(row, col, start_row):  # as above
  return (row < col) & (row >= gpu_la._rows(start_row, row.shape))


PLANTS = {
    # Output pass: Q~ = q (no decay on the inter-chunk term); state pass:
    # gamma = 1 (the state not decayed across a chunk).
    "tpu": [("_q_scale", _without_decay(tpu_la, "_q_scale"), CHANNEL, False),
            ("_carry", _without_decay(tpu_la, "_carry"), CHANNEL, False),
            # per channel, causality is built into the score blocks
            ("_mask", _tpu_mask_off_by_one, SCALAR, False),
            ("_mask_t", _tpu_mask_t_off_by_one, CHANNEL, True)],
    "gpu": [("_q_scale", _without_decay(gpu_la, "_q_scale"), GPU_CHANNEL, False),
            ("_carry", _without_decay(gpu_la, "_carry"), GPU_CHANNEL, False),
            ("_mask_t", _gpu_mask_t_off_by_one, GPU_CHANNEL, True)]}
KERNELS = {"tpu": (tpu_la, TPU), "gpu": (gpu_la, GPU)}


@pytest.mark.parametrize("platform, name, plant, case, grads", [
    pytest.param(p, *plant, marks=[needs_gpu_interpret] if p == "gpu" else [],
                 id=f"{p}-{plant[0]}")
    for p, plants in PLANTS.items() for plant in plants])
def test_planted_bug_is_caught(monkeypatch, platform, name, plant, case, grads):
  module, params = KERNELS[platform]
  monkeypatch.setattr(module, name, plant)
  errs = errors(module.linear_attention, case, grads, interpret=params)
  assert max(errs) > 3 * TOL[case.dtype], errs


# -- lowering for the hardware ---------------------------------------------

def _export_text(fn, case: Case, platform: str) -> str:
  q, k, v, g, seg, s0 = inputs(case)

  def loss(q, k, v, g, s0):
    o, s = fn(q, k, v, g, seg, s0, chunk_size=case.chunk)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  exported = jax.export.export(jax.jit(jax.value_and_grad(loss, range(5))),
                               platforms=[platform])(q, k, v, g, s0)
  return exported.mlir_module()


@pytest.mark.parametrize("platform, case", [
    ("tpu", CHANNEL), ("tpu", BF16), ("gpu", GPU_CHANNEL), ("gpu", GPU_SCALAR)],
    ids=["tpu-channel", "tpu-bf16", "gpu-channel", "gpu-scalar"])
def test_lowers(platform, case):
  # Forward and backward: the gradient program holds all four kernels.
  module = KERNELS[platform][0]
  text = _export_text(module.linear_attention, case,
                      {"gpu": "cuda"}.get(platform, platform))
  call = {"tpu": "tpu_custom_call", "gpu": "mosaic_gpu"}[platform]
  assert text.count(f"custom_call @{call}") >= 4


def test_tpu_declines():
  ok = dict(platform="tpu", dtype=jnp.bfloat16, chunk_size=64)
  assert tpu_la.declines(**ok) is None
  assert "chunk_size 24" in tpu_la.declines(**{**ok, "chunk_size": 24})
  assert "float16" in tpu_la.declines(**{**ok, "dtype": jnp.float16})
  assert "runs on tpu" in tpu_la.declines(**{**ok, "platform": "gpu"})
  assert "chunk_size" in tpu_la.declines(platform="tpu", dtype=jnp.float32)
  with pytest.raises(ValueError, match="chunk_size must be a multiple of 16"):
    tpu_la.linear_attention(*inputs(SCALAR), chunk_size=24)


def test_gpu_declines():
  ok = dict(platform="gpu", dtype=jnp.bfloat16, chunk_size=64, key_dim=128,
            value_dim=64, decay="channel")
  assert gpu_la.declines(**ok) is None
  assert "216 KiB" in gpu_la.declines(**{**ok, "value_dim": 128})
  assert gpu_la.declines(**{**ok, "value_dim": 128, "decay": "scalar"}) is None
  assert "float32" in gpu_la.declines(**{**ok, "dtype": jnp.float32})
  assert "chunk_size 128" in gpu_la.declines(**{**ok, "chunk_size": 128})
  assert "key_dim 96" in gpu_la.declines(**{**ok, "key_dim": 96})
  assert "decay" in gpu_la.declines(platform="gpu", dtype=jnp.bfloat16,
                                    chunk_size=64, key_dim=64, value_dim=64)
  with pytest.raises(ValueError, match="dtype"):
    gpu_la.linear_attention(*inputs(CHANNEL), chunk_size=64)
