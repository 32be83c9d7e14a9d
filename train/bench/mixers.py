"""Mixer benchmarks: how time and memory grow with sequence length.

For each mixer (alone, at width d_model, default or given options):
  * forward and forward+backward time per length L, jitted, compile
    excluded, the median of `repeats` calls (lengths timed in turns), at a
    fixed number of tokens
    per batch (batch = tokens // L, the training regime) or at a fixed
    `batch` (batch 1: the cost of one sequence, what a complexity claim is
    about; costs shared by a batch, such as an SSM's convolution kernel,
    are spread over tokens // L sequences in the first regime, which adds
    up to one power of L to their per-sequence exponent);
  * temporary memory of the compiled forward+backward program
    (`memory_analysis().temp_size_in_bytes`; works on CPU too);
  * decode time per token after prefilling a cache with `ctx` tokens
    (chunked prefill, then timed jitted single-token steps, the contexts
    taken in turns).

The growth exponent k of time ~ L^k is fitted per *sequence* (batch time /
batch size) by least squares in log-log over the `fit` range, next to the
exponent the mixer declares (`info.train_cost`, `base.TRAIN_COSTS`); the
same for memory. Decode time at the largest over the smallest context is
shown next to `info.decode_state` (~1 for constant/bounded state, growing
for a KV cache).

Each measured figure is marked against the mixer's claim (`targets`): a
sub-quadratic cost must fit an exponent within SLACK of its declared slope,
and a constant or bounded decode state must keep the per-token decode time
within 1 + SLACK from the shortest to the longest context.

Outputs under `out`: bench.json, bench.md (with a header naming the device,
dtype, shapes, jax version and the command that reproduces it), bench.png.
They are rewritten after every mixer; rerunning the same command resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shlex
import statistics
import time
import traceback
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import mixers
from layers.mixers.base import TRAIN_COSTS
from layers.params import count_params


PREFILL_CHUNK = 1024  # tokens per prefill call: bounds the memory of long prefills
# Bumped when what is measured changes, so that a resumed run never mixes
# figures taken two ways (it is part of the environment a resume compares).
METHOD = 2


def _opt(default, help: str):
  return dataclasses.field(default=default, metadata={"help": help})


def check_known(what: str, given: Sequence[str], known) -> None:
  """Raise one line naming the entries of `given` not in `known`, and those
  that are."""
  bad = [g for g in given if g not in known]
  if bad:
    raise ValueError(f"{what} {bad} unknown; choose from {list(known)}")


@dataclasses.dataclass(frozen=True)
class BenchSpec:
  """What to measure. Field names are the `mixerlab bench` flags."""
  mixers: tuple[str | dict, ...] = _opt((), "mixer names, comma-separated (default: all registered)")
  d_model: int = _opt(256, "width of each mixer")
  lengths: tuple[int, ...] = _opt((256, 512, 1024, 2048, 4096, 8192, 16384),
                                  "sequence lengths for training cost")
  tokens: int = _opt(16384, "tokens per batch at every length (batch = tokens // L)")
  batch: int = _opt(0, "sequences per batch at every length instead (0: tokens // L)")
  contexts: tuple[int, ...] = _opt((1024, 4096, 16384), "decode context lengths")
  fit: tuple[int, ...] = _opt((2048, 16384), "lo,hi: length range of the exponent fit")
  repeats: int = _opt(5, "timed calls per training measurement (median)")
  decode_steps: int = _opt(50, "timed decode steps per context (median), taken in turns")
  dtype: str = _opt("float32", "activation dtype (parameters stay fp32)")
  out: str = _opt("runs/bench", "output directory")

  def __post_init__(self):
    if len(self.fit) != 2:
      raise ValueError(f"fit must be two lengths lo,hi; got {self.fit}")
    if self.decode_steps < 1:
      raise ValueError(f"decode_steps must be >= 1; got {self.decode_steps}")
    if self.batch < 0:
      raise ValueError(f"batch must be >= 0 (0: tokens // length); got {self.batch}")
    if not self.batch and max(self.lengths) > self.tokens:
      raise ValueError(f"tokens={self.tokens} must be >= the largest length "
                       f"{max(self.lengths)} (batch = tokens // length)")
    bad = [c for c in self.contexts if c > PREFILL_CHUNK and c % PREFILL_CHUNK]
    if bad:
      raise ValueError(f"decode contexts {bad} must be <= {PREFILL_CHUNK} or "
                       f"multiples of it (the prefill chunk)")
    lo, hi = self.fit
    if sum(lo <= L <= hi for L in self.lengths) < 2:
      raise ValueError(f"fit range {self.fit} must hold at least two of the "
                       f"lengths {self.lengths}")


def command(spec: BenchSpec, config_args: Sequence[str] = ()) -> str:
  """The `mixerlab bench` command line that reproduces `spec`."""
  parts = ["mixerlab", "bench", *config_args]
  for f in dataclasses.fields(spec):
    v = getattr(spec, f.name)
    if f.name == "mixers":
      if not all(isinstance(m, str) for m in v):
        continue  # specs with options come from --config, already in config_args
      v = ",".join(v)
    elif isinstance(v, tuple):
      v = ",".join(map(str, v))
    parts += [f"--{f.name.replace('_', '-')}", str(v)]
  return " ".join(shlex.quote(p) for p in parts)


def spec_command(subcommand: str, spec) -> str:
  """`mixerlab <subcommand>` with one flag per field of a bench spec
  (tuples comma-separated, empty ones left out)."""
  parts = ["mixerlab", subcommand]
  for f in dataclasses.fields(spec):
    v = getattr(spec, f.name)
    if isinstance(v, tuple) and not v:
      continue
    parts += [f"--{f.name.replace('_', '-')}",
              ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
  return " ".join(shlex.quote(p) for p in parts)


# -- measuring -----------------------------------------------------------------

def median_time(fn: Callable, *args, repeats: int) -> float:
  """Median wall seconds of `fn(*args)` after one warm-up call."""
  call = functools.partial(_blocking, fn, *args)
  call()
  return medians_in_turns({0: call}, repeats)[0]


def medians_in_turns(calls: dict, rounds: int) -> dict:
  """Median wall seconds of each blocking zero-argument call, the calls
  taken in turns `rounds` times: drift in the machine's speed (a shared
  2-core VM moved single-mixer timings by 2x between runs) then falls on
  every call alike instead of bending a ratio between them."""
  times = {key: [] for key in calls}
  for _ in range(rounds):
    for key, call in calls.items():
      t = time.perf_counter()
      call()
      times[key].append(time.perf_counter() - t)
  return {key: statistics.median(ts) for key, ts in times.items()}


def fit_exponent(lengths: Sequence[float], values: Sequence[float],
                 lo: float, hi: float) -> float | None:
  """Least-squares slope of log(value) vs log(length) over lo <= L <= hi."""
  pts = [(L, v) for L, v in zip(lengths, values) if lo <= L <= hi and v and v > 0]
  if len(pts) < 2:
    return None
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def build(spec, d_model: int, seed: int = 0):
  """(name, module) from a name or {"name": ..., **options}."""
  spec = {"name": spec} if isinstance(spec, str) else dict(spec)
  name = spec.pop("name")
  return name, mixers.build(name, d_model, rngs=nnx.Rngs(seed), **spec)


def _inputs(batch, length, d_model, dtype, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, length, d_model), dtype)


def _blocking(fn, *args):
  return jax.block_until_ready(fn(*args))


def batch_size(spec: BenchSpec, L: int) -> int:
  return spec.batch or spec.tokens // L


def train_costs(module, spec: BenchSpec) -> list[dict]:
  """Per length: forward and forward+backward seconds per batch (medians of
  `repeats` calls) and the temp bytes of the compiled forward+backward.

  Every length is compiled and warmed up first, then the calls are timed in
  turns across lengths (`medians_in_turns`)."""
  # Gradients for the parameters and the input, as in training; fixed
  # buffers (random features, hash rotations, pattern keys) get none.
  graphdef, params, fixed = nnx.split(module, nnx.Param, ...)

  def fwd(params, x, fixed):
    return nnx.merge(graphdef, params, fixed)(x)

  def loss(params, x, fixed):
    return fwd(params, x, fixed).astype(jnp.float32).sum()

  calls, temp = {}, {}
  for L in spec.lengths:
    args = (params, _inputs(batch_size(spec, L), L, spec.d_model,
                            jnp.dtype(spec.dtype)), fixed)
    grad_c = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    temp[L] = grad_c.memory_analysis().temp_size_in_bytes
    for k, fn in (("fwd_s", jax.jit(fwd).lower(*args).compile()),
                  ("fwd_bwd_s", grad_c)):
      calls[L, k] = functools.partial(_blocking, fn, *args)
      calls[L, k]()  # warm-up
  t = medians_in_turns(calls, spec.repeats)
  return [{"length": L, "batch": batch_size(spec, L), "fwd_s": t[L, "fwd_s"],
           "fwd_bwd_s": t[L, "fwd_bwd_s"], "temp_bytes": temp[L]}
          for L in spec.lengths]


def decode_costs(module, spec: BenchSpec) -> list[dict]:
  """Seconds per single-token decode step with each of `spec.contexts`
  tokens in the cache: the median of `decode_steps` steps per context,
  taken in turns across the contexts (`medians_in_turns`)."""
  graphdef, params = nnx.split(module)
  dtype = jnp.dtype(spec.dtype)

  @jax.jit
  def step(params, cache, x):
    return nnx.merge(graphdef, params)(x, cache=cache)

  token = _inputs(1, 1, spec.d_model, dtype, seed=1)
  caches = {}
  for ctx in spec.contexts:
    cache = module.init_cache(1, ctx + spec.decode_steps + 2, dtype)
    chunk = min(ctx, PREFILL_CHUNK)
    piece = _inputs(1, chunk, spec.d_model, dtype)
    for _ in range(ctx // chunk):  # prefill in chunks: bounded memory per call
      _, cache = step(params, cache, piece)
    _, caches[ctx] = jax.block_until_ready(step(params, cache, token))  # compiles
  def advance(ctx):  # one decode step on that context's cache
    _, caches[ctx] = jax.block_until_ready(step(params, caches[ctx], token))

  t = medians_in_turns({ctx: functools.partial(advance, ctx)
                        for ctx in spec.contexts}, spec.decode_steps)
  return [{"context": ctx, "s_per_token": t[ctx]} for ctx in spec.contexts]


def bench_mixer(mixer_spec, spec: BenchSpec, log: Callable[[str], None]) -> dict:
  name, module = build(mixer_spec, spec.d_model)
  info = type(module).info
  res = {"mixer": name, "spec": mixer_spec, "train_cost": info.train_cost,
         "decode_state": info.decode_state, "declared_exponent": TRAIN_COSTS[info.train_cost],
         "params": count_params(module),
         "train": [], "decode": []}
  try:
    res["train"] = train_costs(module, spec)
    log("  fwd+bwd ms: " + ", ".join(f"L={t['length']}: {t['fwd_bwd_s'] * 1e3:.2f}"
                                     for t in res["train"]))
    res["decode"] = decode_costs(module, spec)
  except Exception as e:  # kept in the report; the other mixers still run
    res["error"] = f"{type(e).__name__}: {e}"
    res["traceback"] = traceback.format_exc()
    log(f"  {name} failed: {res['error']}")
  per_seq = {k: [t[k] / t["batch"] for t in res["train"]]
             for k in ("fwd_s", "fwd_bwd_s", "temp_bytes")}
  lengths = [t["length"] for t in res["train"]]
  res["time_exponent"] = fit_exponent(lengths, per_seq["fwd_bwd_s"], *spec.fit)
  res["memory_exponent"] = fit_exponent(lengths, per_seq["temp_bytes"], *spec.fit)
  dec = res["decode"]
  res["decode_ratio"] = (dec[-1]["s_per_token"] / dec[0]["s_per_token"]
                         if len(dec) >= 2 else None)
  return res


def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo where there is one."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment(spec: BenchSpec, cmd: str) -> dict:
  d = jax.devices()[0]
  return {"device": f"{d.platform} ({d.device_kind}), {jax.device_count()} device(s)",
          "host": f"{cpu_name()}, {os.cpu_count()} cores",
          "jax": jax.__version__, "dtype": spec.dtype, "d_model": spec.d_model,
          "tokens_per_batch": spec.tokens, "batch": spec.batch,
          "lengths": list(spec.lengths),
          "contexts": list(spec.contexts), "fit": list(spec.fit),
          "repeats": spec.repeats, "decode_steps": spec.decode_steps,
          "method": METHOD, "command": cmd}


def _write(report: dict, out: str, plot: bool) -> None:
  """bench.json and bench.md (and bench.png), each replaced atomically."""
  os.makedirs(out, exist_ok=True)
  for name, text in (("bench.json", json.dumps(report, indent=1, default=str)),
                     ("bench.md", markdown(report))):
    tmp = os.path.join(out, f".{name}.tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(out, name))
  if plot:
    from train import plots  # matplotlib only when writing
    env = report["environment"]
    plots.bench_plot(report, os.path.join(out, "bench.png"),
                     f"{env['device']}, {env['dtype']}, d_model={env['d_model']}, "
                     f"{batching(env)}")


def _finished(spec: BenchSpec, env: dict) -> dict:
  """Results already in `spec.out` from a run with the same environment
  (device, jax, spec), by mixer spec; errors are not kept, so they rerun."""
  path = os.path.join(spec.out, "bench.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    old = json.load(f)
  if old.get("environment") != json.loads(json.dumps(env, default=str)):
    return {}
  return {json.dumps(m["spec"], sort_keys=True): m for m in old["mixers"]
          if "error" not in m}


def run(spec: BenchSpec, cmd: str, log: Callable[[str], None] = print) -> dict:
  """Benchmark every mixer of `spec`; write bench.{json,md,png} under out.

  The report is rewritten after each mixer, so a long run that is stopped
  keeps what it measured, and rerunning the same command resumes: mixers
  already measured under the same environment are kept, not re-timed."""
  env = environment(spec, cmd)
  done = _finished(spec, env)
  report = {"environment": env, "mixers": []}
  for m in spec.mixers or tuple(mixers.names()):
    key = json.dumps(m, sort_keys=True)
    if key in done:
      log(f"bench {m}: kept from {spec.out}/bench.json")
      report["mixers"].append(done[key])
      continue
    log(f"bench {m}")
    report["mixers"].append(bench_mixer(m, spec, log))
    _write(report, spec.out, plot=False)
  _write(report, spec.out, plot=True)
  return report


# -- report --------------------------------------------------------------------

SLACK = 0.2  # allowed excess of a measured exponent (or decode ratio) over the claim


def expected_exponent(train_cost: str, lo: int, hi: int) -> float:
  """Log-log slope of the declared per-sequence cost between lengths lo and
  hi: 1 for linear, 2 for quadratic, 1 + ln(ln hi / ln lo) / ln(hi / lo) for
  n log n (1.12 over 2K-16K): what a mixer that keeps its claim measures."""
  k = TRAIN_COSTS[train_cost]
  if train_cost == "n log n":
    k += float(np.log(np.log(hi) / np.log(lo)) / np.log(hi / lo))
  return k


def targets(m: dict, fit: Sequence[int]) -> dict:
  """Pass/fail of the measured figures against the mixer's claims, or None
  where the claim sets no target (quadratic cost; a length-growing cache):
    time and memory exponents <= expected + SLACK for sub-quadratic claims;
    decode ratio <= 1 + SLACK for constant or bounded state."""
  exp = expected_exponent(m["train_cost"], *fit)
  sub_quadratic = m["train_cost"] != "quadratic"

  def check(v, limit):
    return None if v is None or limit is None else bool(v <= limit)

  limit = exp + SLACK if sub_quadratic else None
  dec = 1 + SLACK if m["decode_state"] in ("constant", "bounded") else None
  return {"expected": exp, "exp_limit": limit, "decode_limit": dec,
          "time_ok": check(m["time_exponent"], limit),
          "memory_ok": check(m["memory_exponent"], limit),
          "decode_ok": check(m["decode_ratio"], dec)}


def _fmt(v, fmt):
  return "" if v is None else fmt.format(v)


def _mark(ok):
  return {None: "", True: " ✓", False: " ✗"}[ok]


def batching(env: dict) -> str:
  if env.get("batch"):
    return f"batch {env['batch']} at every length"
  return f"{env['tokens_per_batch']} tokens per batch (batch = tokens / L)"


def markdown(report: dict) -> str:
  env = report["environment"]
  lo, hi = env["fit"]
  lines = [
      "# Mixer benchmark", "",
      f"- device: {env['device']}; host {env['host']}; jax {env['jax']}; "
      f"dtype {env['dtype']}",
      f"- d_model {env['d_model']}, {batching(env)}; training: median of "
      f"{env['repeats']} calls per length, compile excluded; decode: median "
      f"of {env.get('decode_steps', env['repeats'])} steps per context; "
      f"lengths and contexts are timed in turns",
      f"- exponents: least-squares slope of log(per-sequence cost) vs log L "
      f"for {lo} <= L <= {hi}; the claim's slope over that range is 1 (linear), "
      f"{expected_exponent('n log n', lo, hi):.2f} (n log n) or 2 (quadratic)",
      f"- targets: sub-quadratic claims measure at most the claim's slope + "
      f"{SLACK} in time and memory; constant or bounded decode state at most "
      f"{1 + SLACK:.1f}x per token from the shortest to the longest context "
      f"(✓ met, ✗ missed, blank: the claim sets no target)",
      f"- reproduce: `{env['command']}`", ""]
  ctx = env["contexts"]
  lines += ["| mixer | params | train_cost | time exp. | memory exp. | target exp. | "
            f"decode {ctx[-1]}/{ctx[0]} | decode_state | error |",
            "|---|---|---|---|---|---|---|---|---|"]
  for m in report["mixers"]:
    t = targets(m, env["fit"])
    lines.append(
        f"| {m['mixer']} | {m['params']:,} | {m['train_cost']} | "
        f"{_fmt(m['time_exponent'], '{:.2f}')}{_mark(t['time_ok'])} | "
        f"{_fmt(m['memory_exponent'], '{:.2f}')}{_mark(t['memory_ok'])} | "
        f"{'≤ ' + format(t['exp_limit'], '.2f') if t['exp_limit'] else 'none'} | "
        f"{_fmt(m['decode_ratio'], '{:.2f}')}{_mark(t['decode_ok'])} | "
        f"{m['decode_state']} | {m.get('error', '')} |")
  lines += ["", "Forward+backward ms per batch (forward ms) by length:", "",
            "| mixer | " + " | ".join(str(L) for L in env["lengths"]) + " |",
            "|---|" + "---|" * len(env["lengths"])]
  for m in report["mixers"]:
    by_len = {t["length"]: t for t in m["train"]}
    cells = [f"{by_len[L]['fwd_bwd_s'] * 1e3:.2f} ({by_len[L]['fwd_s'] * 1e3:.2f})"
             if L in by_len else "" for L in env["lengths"]]
    lines.append(f"| {m['mixer']} | " + " | ".join(cells) + " |")
  lines += ["", "Temporary memory of forward+backward, MiB:", "",
            "| mixer | " + " | ".join(str(L) for L in env["lengths"]) + " |",
            "|---|" + "---|" * len(env["lengths"])]
  for m in report["mixers"]:
    by_len = {t["length"]: t for t in m["train"]}
    cells = [f"{by_len[L]['temp_bytes'] / 2**20:.1f}" if L in by_len else ""
             for L in env["lengths"]]
    lines.append(f"| {m['mixer']} | " + " | ".join(cells) + " |")
  lines += ["", "Decode ms per token by context length:", "",
            "| mixer | " + " | ".join(str(c) for c in ctx) + " |",
            "|---|" + "---|" * len(ctx)]
  for m in report["mixers"]:
    by_ctx = {d["context"]: d for d in m["decode"]}
    cells = [f"{by_ctx[c]['s_per_token'] * 1e3:.3f}" if c in by_ctx else "" for c in ctx]
    lines.append(f"| {m['mixer']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# -- the mixer list (`mixerlab mixers`) -----------------------------------------

def mixer_table(d_model: int = 64, length: int = 256, batch: int = 4,
                repeats: int = 3) -> str:
  """Markdown: each registered mixer's metadata, parameter count at d_model
  and measured forward ms at [batch, length, d_model] (fp32, jitted)."""
  lines = [f"Sequence mixers (params and forward time at d_model={d_model}, "
           f"input [{batch}, {length}, {d_model}] fp32, {jax.devices()[0].platform}):",
           "", "| mixer | family | train_cost | decode_state | segments | params | fwd ms |",
           "|---|---|---|---|---|---|---|"]
  for name in mixers.names():
    info = mixers.info(name)
    _, module = build(name, d_model)
    graphdef, params = nnx.split(module)
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    x = _inputs(batch, length, d_model, jnp.float32)
    ms = median_time(fwd, params, x, repeats=repeats) * 1e3
    n = count_params(module)
    lines.append(f"| {name} | {info.family} | {info.train_cost} | {info.decode_state} | "
                 f"{'yes' if info.supports_segments else 'no'} | {n:,} | {ms:.2f} |")
  return "\n".join(lines) + "\n"
