"""MoE layer benchmark: time and memory against the number of experts at
fixed active parameters (`mixerlab bench-moe`).

For each dispatch and each E (top_k and the expert width fixed, so every
token meets the same active parameters while the total grows with E): the
forward+backward time of one MoE layer on [batch, length, d_model] (the
gradients of the parameters and the input, jitted, compile excluded; the
median of `repeats` calls, all configurations timed in turns) and the
temporary memory of the compiled program. The target: dropless time at the
largest E at most TARGET x its time at the smallest (cost that grows with
the active, not the total, parameters).

Outputs under `out`: bench_moe.json and bench_moe.md (the header names the
device, host, jax, shapes and the command that reproduces them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from layers import channel
from layers.channel.dispatch import DISPATCHES
from layers.params import count_params
from train.bench.mixers import (_blocking, _inputs, _opt, check_known,
                                cpu_name, medians_in_turns, spec_command)

TARGET = 1.5  # dropless time at the largest E over the smallest, at most


@dataclasses.dataclass(frozen=True)
class MoEBenchSpec:
  """What to measure. Field names are the `mixerlab bench-moe` flags."""
  experts: tuple[int, ...] = _opt((8, 16, 32, 64), "numbers of experts")
  dispatches: tuple[str, ...] = _opt(("dropless", "capacity"), "dispatch paths")
  top_k: int = _opt(2, "experts per token")
  d_model: int = _opt(256, "width of the layer")
  hidden: int = _opt(512, "width of each expert (fixed: fixed active parameters)")
  batch: int = _opt(16, "sequences per batch")
  length: int = _opt(1024, "tokens per sequence")
  capacity_factor: float = _opt(1.25, "of the capacity dispatch")
  repeats: int = _opt(5, "timed calls per configuration (median)")
  dtype: str = _opt("float32", "activation dtype (parameters stay fp32)")
  out: str = _opt("runs/bench_moe", "output directory")

  def __post_init__(self):
    check_known("dispatches", self.dispatches, DISPATCHES)
    if not self.experts or min(self.experts) < self.top_k:
      raise ValueError(f"experts {self.experts} must each be >= top_k={self.top_k}")


def command(spec: MoEBenchSpec) -> str:
  """The `mixerlab bench-moe` command line that reproduces `spec`."""
  return spec_command("bench-moe", spec)


def _layer(spec: MoEBenchSpec, dispatch: str, num_experts: int):
  return channel.build("moe", spec.d_model, rngs=nnx.Rngs(0), num_experts=num_experts,
                       top_k=spec.top_k, hidden=spec.hidden, dispatch=dispatch,
                       capacity_factor=spec.capacity_factor)


def measure(spec: MoEBenchSpec) -> list[dict]:
  """One row per (dispatch, E): seconds, temp bytes, params, active FLOPs."""
  x = _inputs(spec.batch, spec.length, spec.d_model, jnp.dtype(spec.dtype))
  calls, rows = {}, []
  for dispatch in spec.dispatches:
    for E in spec.experts:
      layer = _layer(spec, dispatch, E)
      graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

      def loss(params, x, graphdef=graphdef, rest=rest):
        y, aux = nnx.merge(graphdef, params, rest).with_aux(x)
        return y.astype(jnp.float32).sum() + aux.loss

      compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
      calls[dispatch, E] = functools.partial(_blocking, compiled, params, x)
      calls[dispatch, E]()  # warm-up
      rows.append({"dispatch": dispatch, "experts": E, "params": count_params(layer),
                   "active_flops_per_token": layer.flops_per_token(),
                   "temp_bytes": compiled.memory_analysis().temp_size_in_bytes})
  times = medians_in_turns(calls, spec.repeats)
  for r in rows:
    r["fwd_bwd_s"] = times[r["dispatch"], r["experts"]]
  return rows


def ratios(rows: list[dict]) -> dict:
  """Per dispatch: time at the largest E over time at the smallest."""
  out = {}
  for d in dict.fromkeys(r["dispatch"] for r in rows):
    rs = sorted((r for r in rows if r["dispatch"] == d), key=lambda r: r["experts"])
    out[d] = rs[-1]["fwd_bwd_s"] / rs[0]["fwd_bwd_s"]
  return out


def environment(spec: MoEBenchSpec, cmd: str) -> dict:
  d = jax.devices()[0]
  return {"device": f"{d.platform} ({d.device_kind}), {jax.device_count()} device(s)",
          "host": f"{cpu_name()}, {os.cpu_count()} cores", "jax": jax.__version__,
          "spec": dataclasses.asdict(spec), "command": cmd}


def markdown(report: dict) -> str:
  env, spec, rows = report["environment"], report["environment"]["spec"], report["rows"]
  r = report["ratios"]
  lo, hi = min(spec["experts"]), max(spec["experts"])
  ok = r.get("dropless")
  mark = "" if ok is None else (" ✓" if ok <= TARGET else " ✗")
  lines = [
      "# MoE layer benchmark", "",
      f"- device: {env['device']}; host {env['host']}; jax {env['jax']}; dtype {spec['dtype']}",
      f"- one MoE layer, d_model {spec['d_model']}, experts of width {spec['hidden']}, "
      f"top-{spec['top_k']} (fixed active parameters), input [{spec['batch']}, "
      f"{spec['length']}, {spec['d_model']}]; forward+backward (parameter and input "
      f"gradients), median of {spec['repeats']} calls, all configurations in turns, "
      f"compile excluded",
      f"- target: dropless time at E={hi} at most {TARGET}x its time at E={lo}: "
      + ("not measured" if ok is None else f"{ok:.2f}x{mark}"),
      f"- reproduce: `{env['command']}`", "",
      "| dispatch | experts | params | active MFLOP/token | fwd+bwd ms | "
      f"vs E={lo} | temp MiB |", "|---|---|---|---|---|---|---|"]
  base = {x["dispatch"]: x["fwd_bwd_s"] for x in rows if x["experts"] == lo}
  for x in rows:
    lines.append(f"| {x['dispatch']} | {x['experts']} | {x['params']:,} | "
                 f"{x['active_flops_per_token'] / 1e6:.2f} | {x['fwd_bwd_s'] * 1e3:.1f} | "
                 f"{x['fwd_bwd_s'] / base[x['dispatch']]:.2f}x | "
                 f"{x['temp_bytes'] / 2**20:.1f} |")
  return "\n".join(lines) + "\n"


def run(spec: MoEBenchSpec, cmd: str) -> dict:
  """Measure and write bench_moe.{json,md} under spec.out."""
  rows = measure(spec)
  report = {"environment": environment(spec, cmd), "rows": rows, "ratios": ratios(rows)}
  os.makedirs(spec.out, exist_ok=True)
  with open(os.path.join(spec.out, "bench_moe.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(spec.out, "bench_moe.md"), "w") as f:
    f.write(markdown(report))
  return report
