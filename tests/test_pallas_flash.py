"""Pallas flash attention against the einsum oracle `attention.reference`.

The TPU kernels run in TPU interpret mode (`pltpu.InterpretParams`: VMEM
and DMA simulated on CPU), the GPU kernels in Mosaic GPU interpret mode
(shared memory, barriers and TMA simulated); both are lowered for their
platform with `jax.export`. A planted bug (a causal block bound one block
short) shows the equality checks fail.

Tolerances (relative, in norm, outputs and the gradients of q, k, v):
fp32 1e-5 (both compute in fp32; the errors seen are below 1e-6); bf16
2e-2 (the kernel rounds P and dS to bf16 for the matmuls, as
FlashAttention does, the oracle only P; the errors seen are 3e-3 to
4e-3 on TPU and GPU).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.kernels import flash
from layers.kernels.attention import reference
from layers.kernels.pallas import flash_gpu, flash_tpu
from mixer_contract import rel_err
from test_pallas_linear import GPU, TPU, compile_and_run, needs_gpu_interpret

TOL = {"float32": 1e-5, "bfloat16": 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  T: int
  S: int
  H: int
  G: int
  K: int
  call: tuple = ()        # attention_call options, as (name, value) pairs
  segments: tuple = ()    # lengths of the segments of the one batch row
  dtype: str = "float32"


# L = 40 is not a multiple of the 16-row blocks; GQA (2 query heads share
# one key/value head); three packed segments, one starting mid-block; a
# soft-cap.
PACKED = Case(40, 40, 2, 1, 16, (("softcap", 3.0),), (7, 20, 13))
# One head, a sliding window of 9 (blocks outside it skipped), and 24
# queries at offset 16 into 40 keys (a prefill chunk after a cache).
WINDOW = Case(24, 40, 1, 1, 16, (("window", 9), ("q_offset", 16)))
BF16 = dataclasses.replace(PACKED, dtype="bfloat16", call=())
BLOCKS = dict(block_q=16, block_k=16)
# The GPU kernel's blocks are 64-row wgmma tiles, its operands 16-bit and
# its head dims 64 or 128: L = 100 is not a block multiple; GQA, two
# segments (one starting mid-block), a window of 40 and a soft-cap.
GPU_CASE = Case(100, 100, 2, 1, 64, (("softcap", 3.0), ("window", 40)), (30, 70),
                "bfloat16")


def inputs(case: Case, seed=0):
  rng = np.random.default_rng(seed)
  dt = jnp.dtype(case.dtype)
  rand = lambda *s: jnp.asarray(rng.standard_normal(s), dt)
  q = rand(1, case.T, case.H, case.K)
  k, v = rand(1, case.S, case.G, case.K), rand(1, case.S, case.G, case.K)
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  call = dict(case.call)
  if case.segments:
    seg = jnp.asarray(np.repeat(np.arange(len(case.segments)), case.segments)[None],
                      jnp.int32)
    call.update(q_segment_ids=seg, kv_segment_ids=seg)
  return (q, k, v), w, call


def errors(fn, case: Case, grads=True):
  """Relative errors of fn against the oracle: o, then dq, dk, dv."""
  args, w, call = inputs(case)

  def run(attn):
    def loss(q, k, v):
      o = attn(q, k, v, **call)
      return jnp.sum(o.astype(jnp.float32) * w), o
    if not grads:
      return [compile_and_run(lambda *a: loss(*a)[1], *args)]
    (_, o), g = compile_and_run(
        jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), *args)
    return [o, *g]

  return [rel_err(a, b) for a, b in zip(run(fn), run(reference))]


def tpu(q, k, v, **call):
  return flash_tpu.attention(q, k, v, **call, **BLOCKS, interpret=TPU)


@pytest.mark.parametrize("case", [PACKED, WINDOW, BF16],
                         ids=["packed-gqa-softcap", "window-offset", "bf16"])
def test_tpu_matches_reference(case):
  errs = errors(tpu, case)
  assert max(errs) < TOL[case.dtype], errs


def gpu(q, k, v, **call):
  return flash_gpu.attention(q, k, v, **call, interpret=GPU)


@needs_gpu_interpret
def test_gpu_matches_reference():
  errs = errors(gpu, GPU_CASE)
  assert max(errs) < TOL["bfloat16"], errs


def _one_block_short(monkeypatch):
  """A query block that stops one key block short (misses the diagonal)."""
  key_blocks = flash.Plan.key_blocks
  monkeypatch.setattr(flash.Plan, "key_blocks", lambda self, i, off: (
      key_blocks(self, i, off)[0], key_blocks(self, i, off)[1] - 1))


def test_tpu_planted_causal_bound_is_caught(monkeypatch):
  _one_block_short(monkeypatch)
  errs = errors(tpu, dataclasses.replace(PACKED, segments=(40,)), grads=False)
  assert max(errs) > 100 * TOL["float32"], errs


@needs_gpu_interpret
def test_gpu_planted_causal_bound_is_caught(monkeypatch):
  _one_block_short(monkeypatch)
  errs = errors(gpu, dataclasses.replace(GPU_CASE, call=()), grads=False)
  assert max(errs) > 10 * TOL["bfloat16"], errs


@pytest.mark.parametrize("platform, module, custom_call", [
    ("tpu", flash_tpu, "tpu_custom_call"), ("cuda", flash_gpu, "custom_call @mosaic_gpu")])
def test_lowers(platform, module, custom_call):
  """Forward and backward (two kernels) export as Mosaic calls, with every
  mask (causal, window, segments) and the soft-cap at head dim 128."""
  case = dataclasses.replace(GPU_CASE, K=128)
  (q, k, v), w, call = inputs(case)

  def loss(q, k, v):
    return jnp.sum(module.attention(q, k, v, **call).astype(jnp.float32) * w)

  exported = jax.export.export(jax.jit(jax.value_and_grad(loss, (0, 1, 2))),
                               platforms=[platform])(q, k, v)
  assert exported.mlir_module().count(custom_call) >= 3


def test_tpu_declines():
  ok = dict(platform="tpu", dtype=jnp.bfloat16, head_dim=128, q_len=4096,
            kv_len=4096, causal=True, q_offset=0, window=None, segments=True,
            alibi=False, softcap=True)
  declines = flash_tpu.declines
  assert declines(**ok) is None
  for change, reason in [(dict(platform="gpu"), "runs on tpu"),
                         (dict(dtype=jnp.float16), "float16"),
                         (dict(head_dim=100), "head_dim 100"),
                         (dict(head_dim=512), "head_dim 512"),
                         (dict(alibi=True), "ALiBi"),
                         (dict(q_offset=None), "traced q_offset")]:
    assert reason in declines(**{**ok, **change}), change
  (q, k, v), _, _ = inputs(WINDOW)
  with pytest.raises(ValueError, match="ALiBi"):
    flash_tpu.attention(q, k, v, alibi_slopes=jnp.ones(1))


def test_gpu_declines():
  ok = dict(platform="gpu", dtype=jnp.bfloat16, head_dim=128, q_len=4096,
            kv_len=4096, causal=True, q_offset=0, window=64, segments=True,
            alibi=False, softcap=True)
  declines = flash_gpu.declines
  assert declines(**ok) is None
  for change, reason in [(dict(platform="tpu"), "runs on gpu"),
                         (dict(dtype=jnp.float32), "float32"),
                         (dict(head_dim=96), "head_dim 96"),
                         (dict(alibi=True), "ALiBi"),
                         (dict(q_offset=None), "traced q_offset")]:
    assert reason in declines(**{**ok, **change}), change
  (q, k, v), _, _ = inputs(WINDOW)  # fp32, head dim 16
  with pytest.raises(ValueError, match="pallas_gpu.*float32"):
    flash_gpu.attention(q, k, v)
