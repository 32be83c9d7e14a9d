"""Kernel benchmark: each Pallas kernel against its baselines
(`mixerlab bench-kernels`).

For each op, implementation, length L and head dim: the forward and the
forward+backward time of the op alone on bf16 inputs (jitted, compile
excluded, the median of `repeats` calls, all configurations timed in
turns), the TFLOP/s that time gives for the op's model FLOPs, and the
ratio to the op's first baseline (baseline time / this time: > 1 is
faster). Ops and baselines:

  attention          causal, [B, L, H, D] with H = heads; baselines cuDNN
                     (`jax.nn.dot_product_attention`) and the blockwise XLA
                     form. FLOPs: 2 matmuls of L^2 / 2 causal entries,
                     4 B H L^2 D / 2 forward, 2.5x that backward.
  linear_attention   GLA's per-key-channel decay, chunk 64; baseline the
                     pure-JAX chunked form. FLOPs: `flops_per_token` of
                     the chunked form, backward 2x the forward.
  scan               h_t = a_t h_{t-1} + b_t over C = heads * D channels;
                     baseline the XLA associative scan. FLOPs: one
                     multiply-add per element (backward: 3).
  selective_scan     Mamba's S6, d_inner = heads * D, d_state 16; baseline
                     the pure-JAX chunked form. FLOPs: 7 per [D, N]
                     element (backward: 2x).

FLOPs count the useful work of the recurrence or the causal matmuls, the
same for every implementation, so TFLOP/s compare like with like.

On CPU a Pallas kernel runs only in interpret mode, a simulation whose
times say nothing about speed: the bench does not time it and says so.
Implementations that decline a shape are listed with their reason.

Outputs under `out`: bench_kernels.json and bench_kernels.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp

from layers.kernels import linear_attention as la
from layers.kernels.attention import ATTENTION
from layers.kernels.linear_recurrence import LINEAR_RECURRENCE
from layers.kernels.selective_scan import SELECTIVE_SCAN
from train.bench.mixers import (_blocking, _opt, check_known, cpu_name,
                                medians_in_turns, spec_command)

D_STATE = 16
CHUNK = 64
# Targets of issue 13 on an H200, checked only when a GPU measured them.
TARGETS = [
    "flash attention fwd+bwd >= 0.9x cuDNN at L >= 2K, head dim 128",
    "chunked GLA fwd+bwd faster than cuDNN causal attention from L = 2K, >= 5x at 16K",
    "selective scan >= 20x the XLA associative scan at L = 4K",
]
INTERPRET_ONLY = ("not timed: on CPU a Pallas kernel runs only in interpret "
                  "mode, whose timings are not speed")


def _attention(impl, B, L, H, D, dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (B, L, H, D), dtype) for key in keys)
  facts = dict(dtype=dtype, head_dim=D, q_len=L, kv_len=L, causal=True,
               q_offset=0, window=None, segments=False, alibi=False,
               softcap=False)
  fwd = 4.0 * B * H * L * L * D / 2
  return (q, k, v), facts, lambda q, k, v: impl.fn(q, k, v, causal=True), fwd, 3.5


def _linear_attention(impl, B, L, H, D, dtype):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (B, L, H, D), dtype) for key in keys[:3])
  g = -jax.nn.softplus(jax.random.normal(keys[3], (B, L, H, D)))
  seg = jnp.zeros((B, L), jnp.int32)
  s0 = jnp.zeros((B, H, D, D), jnp.float32)
  facts = dict(dtype=dtype, chunk_size=CHUNK, key_dim=D, value_dim=D,
               decay="channel")
  fwd = B * L * H * la.flops_per_token("chunked", L, CHUNK, D, D)
  run = lambda q, k, v, g: impl.fn(q, k, v, g, seg, s0, chunk_size=CHUNK)[0]
  return (q, k, v, g), facts, run, fwd, 3.0


def _scan(impl, B, L, H, D, dtype):
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.nn.sigmoid(jax.random.normal(keys[0], (B, L, H * D))).astype(dtype)
  b = jax.random.normal(keys[1], (B, L, H * D), dtype)
  h0 = jnp.zeros((B, H * D), jnp.float32)
  run = lambda a, b: impl.fn(a, b, h0)[0]
  return (a, b), dict(dtype=dtype), run, 2.0 * B * L * H * D, 4.0


def _selective_scan(impl, B, L, H, D, dtype):
  keys = jax.random.split(jax.random.key(0), 5)
  C = H * D
  x = jax.random.normal(keys[0], (B, L, C), dtype)
  dt = jax.nn.softplus(jax.random.normal(keys[1], (B, L, C))).astype(dtype)
  A = -jnp.exp(jax.random.normal(keys[2], (C, D_STATE)))
  Bm, Cm = (jax.random.normal(key, (B, L, D_STATE), dtype) for key in keys[3:])
  run = lambda x, dt, Bm, Cm: impl.fn(x, dt, A, Bm, Cm, chunk_size=CHUNK)[0]
  return ((x, dt, Bm, Cm), dict(dtype=dtype, d_state=D_STATE), run,
          7.0 * B * L * C * D_STATE, 3.0)


@dataclasses.dataclass(frozen=True)
class Bench:
  op: object
  kernels: tuple[str, ...]
  baselines: tuple[str, ...]
  make: object  # (impl, B, L, H, D, dtype) -> (args, facts, fn, fwd FLOPs, fwd+bwd / fwd)


OPS = {
    "attention": Bench(ATTENTION, ("pallas_tpu", "pallas_gpu"), ("cudnn", "blockwise"),
                       _attention),
    "linear_attention": Bench(la.LINEAR_ATTENTION, ("pallas_tpu", "pallas_gpu"),
                              ("chunked",), _linear_attention),
    "scan": Bench(LINEAR_RECURRENCE, ("pallas_tpu", "pallas_gpu"), ("associative",),
                  _scan),
    "selective_scan": Bench(SELECTIVE_SCAN, ("pallas_gpu",), ("chunked",),
                            _selective_scan),
}


@dataclasses.dataclass(frozen=True)
class KernelBenchSpec:
  """What to measure. Field names are the `mixerlab bench-kernels` flags."""
  ops: tuple[str, ...] = _opt(tuple(OPS), "ops to measure")
  impls: tuple[str, ...] = _opt(
      (), "implementations as op:impl (default: each op's kernels and baselines)")
  lengths: tuple[int, ...] = _opt((1024, 2048, 4096, 8192, 16384), "sequence lengths")
  head_dims: tuple[int, ...] = _opt((64, 128), "head dims (scans: channels = heads * D)")
  heads: int = _opt(16, "heads")
  tokens: int = _opt(32768, "tokens per batch at every length (batch = tokens // L, >= 1)")
  repeats: int = _opt(5, "timed calls per configuration (median)")
  dtype: str = _opt("bfloat16", "input dtype")
  out: str = _opt("runs/bench_kernels", "output directory")

  def __post_init__(self):
    check_known("ops", self.ops, OPS)
    for pair in self.impls:
      op, _, impl = pair.partition(":")
      if op not in OPS or impl not in OPS[op].op.names():
        raise ValueError(f"impls entry {pair!r}: write op:impl with op one of "
                         f"{list(OPS)} and impl one of that op's implementations")

  def chosen(self, op: str) -> tuple[str, ...]:
    if self.impls:
      return tuple(i for o, _, i in (p.partition(":") for p in self.impls) if o == op)
    return OPS[op].kernels + OPS[op].baselines


def command(spec: KernelBenchSpec) -> str:
  """The `mixerlab bench-kernels` command line that reproduces `spec`."""
  return spec_command("bench-kernels", spec)


def _loss(run):
  def loss(*args):
    return jnp.sum(run(*args).astype(jnp.float32))
  return loss


def measure(spec: KernelBenchSpec) -> tuple[list[dict], list[dict]]:
  """Rows of timed configurations, and the ones not timed with why."""
  platform = jax.default_backend()
  dtype = jnp.dtype(spec.dtype)
  calls, rows, skipped = {}, [], []
  for op_name in spec.ops:
    bench = OPS[op_name]
    for name in spec.chosen(op_name):
      impl = bench.op.impls[name]
      if platform == "cpu" and name.startswith("pallas"):
        skipped.append({"op": op_name, "impl": name, "why": INTERPRET_ONLY})
        continue
      for L in spec.lengths:
        for D in spec.head_dims:
          B = max(1, spec.tokens // L)
          args, facts, run, fwd_flops, bwd_factor = bench.make(
              impl, B, L, spec.heads, D, dtype)
          reason = impl.declines(platform=platform, **facts)
          if reason:
            skipped.append({"op": op_name, "impl": name, "L": L, "D": D,
                            "why": f"declines: {reason}"})
            continue
          key = (op_name, name, L, D)
          grad = jax.grad(_loss(run), argnums=tuple(range(len(args))))
          for kind, fn, flops in (("fwd", run, fwd_flops),
                                  ("fwd_bwd", grad, fwd_flops * bwd_factor)):
            compiled = jax.jit(fn).lower(*args).compile()
            calls[key + (kind,)] = functools.partial(_blocking, compiled, *args)
            calls[key + (kind,)]()  # warm-up
            rows.append({"op": op_name, "impl": name, "L": L, "D": D, "batch": B,
                         "pass": kind, "flops": flops})
  times = medians_in_turns(calls, spec.repeats)
  for r in rows:
    r["s"] = times[r["op"], r["impl"], r["L"], r["D"], r["pass"]]
    r["tflops"] = r["flops"] / r["s"] / 1e12
  for r in rows:  # against the op's first baseline timed at the same point
    base = [x for b in OPS[r["op"]].baselines for x in rows
            if x["impl"] == b and (x["op"], x["L"], x["D"], x["pass"])
            == (r["op"], r["L"], r["D"], r["pass"])]
    r["baseline"] = base[0]["impl"] if base else None
    r["ratio"] = base[0]["s"] / r["s"] if base else None
  return rows, skipped


def environment(spec: KernelBenchSpec, cmd: str) -> dict:
  d = jax.devices()[0]
  return {"device": f"{d.platform} ({d.device_kind}), {jax.device_count()} device(s)",
          "platform": d.platform, "host": f"{cpu_name()}, {os.cpu_count()} cores",
          "jax": jax.__version__, "spec": dataclasses.asdict(spec), "command": cmd}


def markdown(report: dict) -> str:
  env, spec = report["environment"], report["environment"]["spec"]
  lines = [
      "# Kernel benchmark", "",
      f"- device: {env['device']}; host {env['host']}; jax {env['jax']}; "
      f"dtype {spec['dtype']}, {spec['heads']} heads, {spec['tokens']} tokens per batch",
      f"- median of {spec['repeats']} calls, all configurations in turns, compile "
      "excluded; ratio = baseline time / this time (> 1: faster)",
      f"- reproduce: `{env['command']}`"]
  if env["platform"] == "cpu":
    lines.append("- CPU: the times below are of the pure-JAX forms on this CPU; no "
                 "Pallas kernel is timed (interpret mode is a simulation, not speed)")
  if env["platform"] != "gpu":
    lines.append("- H200 targets, not measured on a GPU yet: " + "; ".join(TARGETS))
  lines += ["", "| op | impl | L | D | batch | pass | ms | TFLOP/s | ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
  for r in report["rows"]:
    ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x vs {r['baseline']}"
    lines.append(f"| {r['op']} | {r['impl']} | {r['L']} | {r['D']} | {r['batch']} | "
                 f"{r['pass']} | {r['s'] * 1e3:.2f} | {r['tflops']:.3g} | {ratio} |")
  if report["skipped"]:
    lines += ["", "Not timed:", ""]
    for s in report["skipped"]:
      where = f" at L={s['L']}, D={s['D']}" if "L" in s else ""
      lines.append(f"- {s['op']} {s['impl']}{where}: {s['why']}")
  return "\n".join(lines) + "\n"


def run(spec: KernelBenchSpec, cmd: str) -> dict:
  """Measure and write bench_kernels.{json,md} under spec.out."""
  rows, skipped = measure(spec)
  report = {"environment": environment(spec, cmd), "rows": rows, "skipped": skipped}
  os.makedirs(spec.out, exist_ok=True)
  with open(os.path.join(spec.out, "bench_kernels.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(spec.out, "bench_kernels.md"), "w") as f:
    f.write(markdown(report))
  return report
