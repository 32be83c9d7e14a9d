"""The Pallas kernels inside their ops: per-platform order, declines with a
reason, the pure-JAX forms on CPU, forced kernels failing loudly through a
mixer's option, and cost tables that know every implementation."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from layers import mixers
from layers.kernels import linear_attention as la
from layers.kernels.attention import ATTENTION
from layers.kernels.linear_recurrence import (LINEAR_RECURRENCE, RECURRENCE_FLOPS,
                                              linear_scan, sequential)
from layers.kernels.selective_scan import SELECTIVE_SCAN, s6_flops_per_token

ATTN = dict(dtype=jnp.bfloat16, head_dim=128, q_len=2048, kv_len=2048,
            causal=True, q_offset=0, window=None, segments=False, alibi=False,
            softcap=False)
LINEAR = dict(dtype=jnp.bfloat16, chunk_size=64, key_dim=64, value_dim=64,
              decay="channel")


def chosen(op, platform, **query):
  return op.choose("auto", platform=platform, **query).name


def test_attention_order():
  assert chosen(ATTENTION, "tpu", **ATTN) == "pallas_tpu"
  assert chosen(ATTENTION, "tpu", **{**ATTN, "segments": True, "window": 128,
                                     "softcap": True}) == "pallas_tpu"
  # ALiBi and a traced offset (decoding) fall back to the blockwise form.
  assert chosen(ATTENTION, "tpu", **{**ATTN, "alibi": True}) == "blockwise"
  assert chosen(ATTENTION, "tpu", **{**ATTN, "q_offset": None}) == "blockwise"
  assert chosen(ATTENTION, "gpu", **ATTN) == "cudnn"  # until measured on a GPU
  assert chosen(ATTENTION, "gpu", **{**ATTN, "segments": True}) == "pallas_gpu"
  assert chosen(ATTENTION, "gpu", **{**ATTN, "alibi": True}) == "blockwise"
  assert chosen(ATTENTION, "cpu", **ATTN) == "blockwise"
  with pytest.raises(ValueError, match="pallas_tpu.*ALiBi"):
    ATTENTION.choose("pallas_tpu", platform="tpu", **{**ATTN, "alibi": True})


def test_linear_attention_order():
  assert chosen(la.LINEAR_ATTENTION, "tpu", **LINEAR) == "pallas_tpu"
  assert chosen(la.LINEAR_ATTENTION, "gpu", **LINEAR) == "pallas_gpu"
  assert chosen(la.LINEAR_ATTENTION, "cpu", **LINEAR) == "chunked"
  # The GPU kernel's chunk is one 64-row tile and its operands 16-bit.
  assert chosen(la.LINEAR_ATTENTION, "gpu", **{**LINEAR, "chunk_size": 256}) == "chunked"
  assert chosen(la.LINEAR_ATTENTION, "tpu", **{**LINEAR, "chunk_size": 40}) == "chunked"
  with pytest.raises(ValueError, match="pallas_gpu.*float32"):
    la.LINEAR_ATTENTION.choose("pallas_gpu", platform="gpu",
                               **{**LINEAR, "dtype": jnp.float32})


def test_scan_orders():
  assert chosen(LINEAR_RECURRENCE, "tpu", dtype=jnp.float32) == "pallas_tpu"
  assert chosen(LINEAR_RECURRENCE, "gpu", dtype=jnp.float32) == "pallas_gpu"
  assert chosen(LINEAR_RECURRENCE, "cpu", dtype=jnp.float32) == "sequential"
  # S5's complex scan: the kernels scan real floats only.
  assert chosen(LINEAR_RECURRENCE, "tpu", dtype=jnp.complex64) == "associative"
  assert chosen(SELECTIVE_SCAN, "gpu", dtype=jnp.float32, d_state=16) == "pallas_gpu"
  assert chosen(SELECTIVE_SCAN, "gpu", dtype=jnp.float32, d_state=64) == "chunked"
  assert chosen(SELECTIVE_SCAN, "tpu", dtype=jnp.float32, d_state=16) == "chunked"
  assert chosen(SELECTIVE_SCAN, "cpu", dtype=jnp.float32, d_state=16) == "sequential"


def test_cost_tables_know_every_impl():
  for name in LINEAR_RECURRENCE.names():
    assert RECURRENCE_FLOPS[name] > 0
  for name in SELECTIVE_SCAN.names():
    assert s6_flops_per_token(name, 8, 4) > 0
  for name in la.LINEAR_ATTENTION.names() + ["auto"]:
    assert la.flops_per_token(name, 128, 64, 16, 16) > 0


def test_linear_scan_any_trailing_shape():
  """a broadcast over b [B, L, 2, 3], complex kept complex."""
  key = jax.random.split(jax.random.key(0), 3)
  b = jax.random.normal(key[0], (2, 5, 2, 3)) * (1 + 1j)
  a = jax.random.uniform(key[1], (3,)) * 0.9 + 0.05j
  h0 = jax.random.normal(key[2], (2, 2, 3)).astype(jnp.complex64)
  h, last = linear_scan(a, b, h0, "associative")
  want, want_last = sequential(jnp.broadcast_to(a, b.shape).reshape(2, 5, 6),
                               b.reshape(2, 5, 6), h0.reshape(2, 6))
  assert h.dtype == jnp.complex64 and h.shape == b.shape
  assert jnp.allclose(h.reshape(2, 5, 6), want, atol=1e-5)
  assert jnp.allclose(last.reshape(2, 6), want_last, atol=1e-5)


@pytest.mark.parametrize("name, options, reason", [
    ("attention", {"kernel": "pallas_tpu"}, "runs on tpu, not cpu"),
    ("gla", {"kernel": "pallas_gpu"}, "runs on gpu, not cpu"),
    ("mamba", {"kernel": "pallas_gpu"}, "runs on gpu, not cpu"),
    ("rglru", {"kernel": "pallas_tpu"}, "runs on tpu, not cpu"),
])
def test_forced_kernel_fails_loudly(name, options, reason):
  m = mixers.build(name, 32, rngs=nnx.Rngs(0), **options)
  with pytest.raises(ValueError, match=reason):
    m(jnp.ones((1, 8, 32)))


def test_bench_kernels_smoke(tmp_path, capsys):
  """Tiny sizes, pure-JAX forms only; a Pallas kernel asked for on CPU is
  listed as not timed, never given a speed."""
  import json
  import os
  from train.bench import kernels as bench_kernels
  from train.cli import main
  out = str(tmp_path / "bk")
  impls = ("attention:reference,attention:pallas_tpu,linear_attention:recurrent,"
           "scan:associative,scan:sequential,selective_scan:sequential")
  assert main(["bench-kernels", "--impls", impls, "--lengths", "16",
               "--head-dims", "8", "--heads", "2", "--tokens", "32",
               "--repeats", "1", "--dtype", "float32", "--out", out]) == 0
  report = json.load(open(os.path.join(out, "bench_kernels.json")))
  timed = {(r["op"], r["impl"], r["pass"]) for r in report["rows"]}
  assert len(timed) == 10 and ("attention", "pallas_tpu", "fwd") not in timed
  assert report["skipped"] == [{"op": "attention", "impl": "pallas_tpu",
                                "why": bench_kernels.INTERPRET_ONLY}]
  scan = {r["impl"]: r for r in report["rows"]
          if r["op"] == "scan" and r["pass"] == "fwd"}
  assert scan["sequential"]["baseline"] == "associative"
  assert scan["sequential"]["ratio"] == pytest.approx(
      scan["associative"]["s"] / scan["sequential"]["s"])
  md = open(os.path.join(out, "bench_kernels.md")).read()
  assert "no Pallas kernel is timed" in md and "not measured on a GPU yet" in md
  assert main(["bench-kernels", "--impls", "scan:flash"]) == 2
  assert "impls entry 'scan:flash'" in capsys.readouterr().err
