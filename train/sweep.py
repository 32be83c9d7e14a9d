"""Sweeps: many runs from one file, resumable, with a results table.

A sweep file (YAML):

    base: ../tiny.yaml              # config file(s) every run starts from, or
                                    # an inline mapping shaped like Config
    overrides: [train.steps=40]     # optional, for every run
    grid:                           # optional; the product of its axes
      task: [../tasks/text.yaml, ../tasks/mqar.yaml]   # an axis of config files
      mixer: registered             # every registered mixer, at its defaults
    mixer_options:                  # optional; options for some registered mixers
      rwkv6: {head_dim: 16}         #   (a run named rwkv6, with these options)
      optimizer.lr: [1.0e-3, 3.0e-3]  # a dotted key: an axis of values
    variants:                       # optional; explicit runs (times the grid)
      - {name: griffin, files: [../hybrids/griffin.yaml]}
      - {model.d_model: 128}
    best_lr: true                   # also keep the best lr per other setting
    timeout_s: 300                  # a run still going after this is failed
    executor: {name: slurm, workers: 8, params: {slurm_partition: gpu}}
                                    # optional: runs as cluster jobs (sweep_jobs.py)

Paths are relative to the sweep file. A grid key with a dot is a config
key; any other key names an axis of config files, except `mixer:
registered`: one run per mixer in `layers.mixers.names()`, each as
`model.mixer=<name>` (`mixer_options` gives some of them options, e.g. a
head size that fits a small width; otherwise a mixer that needs other
options is a variant with its file or dotted keys). Each run gets a stable
directory name from its axis values (or the variant's `name`), under
<out>/runs/. Files merge in the order base, grid axes, variant files (each
once, see `train.configs`), then overrides: sweep, grid, variant, command line.

`run_sweep` runs the variants one after another. The state file
<out>/sweep.json records each run's status; a re-invocation skips finished
and failed runs (`retry_failed` retries those) and calls the trainer again
on interrupted ones, which resumes from their checkpoints. A failing run
leaves its traceback in <run_dir>/traceback.txt, is marked failed with its
error, and the sweep goes on. `supervise` (what `mixerlab sweep` uses) runs
the sweep in a child process so that a hard crash or a hang of one run (a
segfault in XLA or a mixer) is recorded the same way instead of ending or
stalling the sweep.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import fnmatch
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Mapping, Sequence

from layers import mixers
from train import configs, results
from train.config import Config

STATE = "sweep.json"
TRACEBACK = "traceback.txt"
DONE, FAILED, RUNNING = "done", "failed", "running"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One run of a sweep: its name, labels (axis -> value) and config."""
  name: str
  labels: dict
  files: tuple[str, ...]
  overrides: tuple[str, ...]


EXECUTORS = ("inprocess", "local", "slurm")


@dataclasses.dataclass(frozen=True)
class Executor:
  """Where the runs go (train/sweep_jobs.py): "inprocess" (`run_sweep`
  under `supervise`), or submitit jobs, `workers` at a time, on "local"
  subprocesses or "slurm"; `params` go to submitit as they are."""
  name: str = "inprocess"
  workers: int = 1
  params: Mapping = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.name not in EXECUTORS:
      raise configs.ConfigError(f"executor.name={self.name!r} must be one of {EXECUTORS}")
    if not isinstance(self.workers, int) or self.workers < 1:
      raise configs.ConfigError(f"executor.workers={self.workers!r} must be an int >= 1")
    if not isinstance(self.params, Mapping):
      raise configs.ConfigError(f"executor.params={self.params!r} must be a mapping "
                                "of submitit parameters (e.g. {slurm_partition: gpu})")

  @classmethod
  def from_yaml(cls, raw) -> Executor:
    if not isinstance(raw, Mapping):
      raise configs.ConfigError(f"executor: {raw!r} must be a mapping with keys "
                                "name, workers, params")
    unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise configs.ConfigError(f"executor: unknown keys {sorted(unknown)}; "
                                "allowed: name, workers, params")
    return cls(**raw)


@dataclasses.dataclass(frozen=True)
class Sweep:
  path: str
  base_files: tuple[str, ...]
  base_inline: dict
  variants: tuple[Variant, ...]
  best_lr: bool
  timeout_s: float | None  # per run, enforced by `supervise` or the job executor
  executor: Executor = Executor()

  def config(self, v: Variant, overrides: Sequence[str] = ()) -> Config:
    """The run's Config; the inline base (if any) is merged first."""
    first = [(f"{self.path} (inline base)", self.base_inline)] if self.base_inline else []
    return configs.load([*self.base_files, *v.files], [*v.overrides, *overrides], first)


def slug(value) -> str:
  """A short path-safe text for a value in a run name."""
  if isinstance(value, Mapping):
    value = dict(value)
    head = str(value.pop("name", ""))
    return "-".join([head, *(f"{k}{slug(v)}" for k, v in sorted(value.items()))])
  if isinstance(value, (list, tuple)):
    return "+".join(slug(v) for v in value)
  return re.sub(r"[^\w.=+-]", "", str(value))


def _override(key: str, value) -> str:
  return f"{key}={json.dumps(value)}"


def _label(key: str, value) -> str:
  """"lr=0.001" for optimizer.lr = 0.001."""
  return f"{key.rsplit('.', 1)[-1]}={slug(value)}"


def _axis(key: str, values, here: str, mixer_options: Mapping) -> list[tuple[str, dict]]:
  """[(label, {"files": [...]} or {"overrides": [...]})] for one grid axis."""
  if "." in key:
    if not isinstance(values, list):
      raise configs.ConfigError(f"grid axis {key!r} needs a list of values, got {values!r}")
    return [(_label(key, v), {"overrides": [_override(key, v)]}) for v in values]
  if key == "mixer" and values == "registered":
    return [(n, {"overrides": [_override(
        "model.mixer", {"name": n, **mixer_options[n]} if n in mixer_options else n)]})
            for n in mixers.names()]
  if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
    raise configs.ConfigError(
        f"grid axis {key!r} (no dot: an axis of config files) needs a list of "
        f"paths{' or registered' if key == 'mixer' else ''}, got {values!r}")
  return [(os.path.splitext(os.path.basename(v))[0], {"files": [os.path.join(here, v)]})
          for v in values]


def _variant_part(spec: Mapping, here: str) -> tuple[str, dict]:
  spec = dict(spec)
  name = spec.pop("name", None)
  files = [os.path.join(here, f) for f in spec.pop("files", [])]
  plain = [k for k in spec if "." not in k]
  if plain:
    raise configs.ConfigError(f"variant keys {plain}: a variant holds `name`, "
                              "`files` and dotted config keys (model.d_model)")
  overrides = [_override(k, v) for k, v in spec.items()]
  label = name or "__".join(
      [*(os.path.splitext(os.path.basename(f))[0] for f in files),
       *(_label(k, v) for k, v in spec.items())])
  return label, {"files": files, "overrides": overrides}


SWEEP_KEYS = ("base", "overrides", "grid", "variants", "best_lr", "timeout_s", "executor",
              "mixer_options")


def _mixer_options(path: str, raw) -> dict:
  unknown = set(raw) - set(mixers.names()) if isinstance(raw, Mapping) else None
  if unknown is None or not all(isinstance(v, Mapping) for v in raw.values()):
    raise configs.ConfigError(f"{path}: mixer_options needs a mapping from mixer "
                              f"names to option mappings, got {raw!r}")
  if unknown:
    raise configs.ConfigError(f"{path}: mixer_options names unknown mixers "
                              f"{sorted(unknown)}; registered: {', '.join(mixers.names())}")
  return {k: dict(v) for k, v in raw.items()}


def load(path: str) -> Sweep:
  raw = configs.read_yaml(path, "sweep file")
  unknown = set(raw) - set(SWEEP_KEYS)
  if unknown:
    raise configs.ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; "
                              f"allowed: {', '.join(SWEEP_KEYS)}")
  here = os.path.dirname(path)
  base = raw.get("base", [])
  inline = base if isinstance(base, Mapping) else {}
  base_files = () if inline else tuple(
      os.path.join(here, b) for b in ([base] if isinstance(base, str) else base))
  options = _mixer_options(path, raw.get("mixer_options", {}))
  axes = [[(k, lab, part) for lab, part in _axis(k, v, here, options)]
          for k, v in raw.get("grid", {}).items()]
  if "variants" in raw:
    axes.append([("variant", *_variant_part(v, here)) for v in raw["variants"]])
  variants = []
  for combo in itertools.product(*axes):
    variants.append(Variant(
        name="__".join(lab for _, lab, _ in combo) or "run",
        labels={axis: lab for axis, lab, _ in combo},
        files=tuple(f for *_, part in combo for f in part.get("files", [])),
        overrides=tuple([*raw.get("overrides", []),
                         *(o for *_, part in combo for o in part.get("overrides", []))])))
  names = [v.name for v in variants]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise configs.ConfigError(f"{path}: several runs are named {dupes}; give "
                              "the variants distinct `name`s")
  return Sweep(path, base_files, inline, tuple(variants), bool(raw.get("best_lr", False)),
               raw.get("timeout_s"), Executor.from_yaml(raw.get("executor", {})))


# -- running -----------------------------------------------------------------

def _read_state(out: str) -> dict:
  path = os.path.join(out, STATE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)  # a killed sweep never leaves half a state file


def config_hash(cfg: Config) -> str:
  return hashlib.sha1(configs.dumps(cfg).encode()).hexdigest()[:12]


def use_compile_cache(out: str) -> str:
  """Keep XLA executables in <out>/xla_cache (jax's persistent compilation
  cache, process-wide). Runs that differ only in data (text vs MQAR at the
  same shapes) or a re-invoked sweep then skip compilation, which dominates
  tiny runs. Call before anything compiles."""
  import jax
  path = os.path.abspath(os.path.join(out, "xla_cache"))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path


def trainer_run(cfg: Config) -> dict:
  from train import loop  # the trainer pulls in orbax/grain; import on use
  return loop.run(cfg)


def attempt(cfg: Config, run_fn, entry: dict, log) -> None:
  """Run one variant, recording the outcome in `entry`. Python errors are
  caught; a hard crash (segfault, abort) kills the process, but faulthandler
  has written the Python stack to the run's traceback.txt first."""
  tb_path = os.path.join(cfg.train.run_dir, TRACEBACK)
  with open(tb_path, "w") as tb:
    faulthandler.enable(tb)
    try:
      summary = run_fn(cfg)
    except Exception as e:  # recorded; the sweep goes on
      tb.write(traceback.format_exc())
      entry.update(status=FAILED, error=f"{type(e).__name__}: {e}")
      log(f"    failed: {type(e).__name__}: {e}")
      return
    finally:
      faulthandler.disable()
  os.remove(tb_path)
  entry.update(status=DONE, summary=summary, wall_s=time.time() - entry["started"])


def plan(sweep: Sweep, out: str, overrides: Sequence[str] = (), skip: Sequence[str] = (),
         retry_failed: bool = False, log: Callable[[str], None] = print,
         only: Sequence[str] = ()) -> tuple[dict[str, Config], dict, list[Variant]]:
  """(config per run, the state file's contents, the variants to run now:
  not done, nor failed unless retry_failed, nor in `skip`, nor left out by
  `only`: glob patterns on run names, e.g. to add runs to a sweep measured
  before). A run whose config changed since the state file recorded it is
  refused."""
  os.makedirs(out, exist_ok=True)
  cfgs = {v.name: configs.replace(sweep.config(v, overrides), train={
      "run_dir": os.path.join(out, "runs", v.name)}) for v in sweep.variants}
  state, todo = _read_state(out), []
  for i, v in enumerate(sweep.variants):
    entry = state.get(v.name, {})
    if entry and entry.get("config_hash") != config_hash(cfgs[v.name]):
      raise configs.ConfigError(
          f"run {v.name!r} in {out} was started with a different config; use "
          "another output directory or delete that run's directory and entry")
    status = entry.get("status")
    if status == DONE or (status == FAILED and not retry_failed) or v.name in skip:
      log(f"[{i + 1}/{len(cfgs)}] {v.name}: {entry.get('status')}, skipped")
    elif only and not any(fnmatch.fnmatchcase(v.name, g) for g in only):
      log(f"[{i + 1}/{len(cfgs)}] {v.name}: not in --only, skipped")
    else:
      todo.append(v)
  return cfgs, state, todo


def mark_running(state: dict, out: str, v: Variant, cfg: Config, **where) -> dict:
  """Record `v` as running (`where`: the process or job it runs in) and
  return its entry."""
  state[v.name] = {"status": RUNNING, "config_hash": config_hash(cfg), "labels": v.labels,
                   "started": time.time(), **where}
  write_state(state, out)
  os.makedirs(cfg.train.run_dir, exist_ok=True)  # the trainer writes its config.yaml
  return state[v.name]


def write_state(state: dict, out: str) -> None:
  _write_json(os.path.join(out, STATE), state)


def tables(sweep: Sweep, cfgs: dict[str, Config], state: dict, out: str) -> dict:
  """Write the tables (`results.write`) and plots under out and return
  results.write's dict, the plots among its files."""
  rows = [results.row(v.name, v.labels, cfgs[v.name], state.get(v.name, {}))
          for v in sweep.variants]
  written = results.write(rows, out, best_lr=sweep.best_lr)
  from train import plots  # matplotlib only when writing
  written["files"] += plots.sweep_plots(written["shown"], out)
  return written


def run_sweep(sweep: Sweep, out: str, overrides: Sequence[str] = (),
              run_fn: Callable[[Config], dict] = trainer_run,
              log: Callable[[str], None] = print, skip: Sequence[str] = (),
              retry_failed: bool = False, only: Sequence[str] = ()) -> dict:
  """Run every variant `plan` gives into out/runs/<name>, one after another
  in this process, then write the tables (see `tables`)."""
  cfgs, state, todo = plan(sweep, out, overrides, skip, retry_failed, log, only)
  for v in todo:
    i = sweep.variants.index(v)
    log(f"[{i + 1}/{len(cfgs)}] {v.name}: {'resuming' if v.name in state else 'starting'}")
    # pid: for `supervise`, which run a crashed or hung child was in
    entry = mark_running(state, out, v, cfgs[v.name], pid=os.getpid())
    attempt(cfgs[v.name], run_fn, entry, log)
    write_state(state, out)
  return tables(sweep, cfgs, state, out)


def _running_in(out: str, pid: int) -> tuple[str, dict] | None:
  """The run that process `pid` is in, from the state file."""
  for name, e in _read_state(out).items():
    if e["status"] == RUNNING and e.get("pid") == pid:
      return name, e
  return None


def _wait(child: subprocess.Popen, out: str, timeout_s: float | None) -> tuple[int, bool]:
  """(exit code, timed out): abort the child when one run exceeds timeout_s;
  faulthandler then writes where it hung to the run's traceback.txt."""
  if timeout_s is None:
    return child.wait(), False
  while True:
    try:
      return child.wait(timeout=2.0), False
    except subprocess.TimeoutExpired:
      current = _running_in(out, child.pid)
      if current and time.time() - current[1]["started"] > timeout_s:
        child.send_signal(signal.SIGABRT)
        return child.wait(), True


def supervise(worker_cmd: Sequence[str], out: str, timeout_s: float | None = None,
              log: Callable[[str], None] = print) -> int:
  """Run a sweep in child processes: `worker_cmd + ["--skip", names]` runs
  `run_sweep` skipping `names`. When a child dies from a signal (a crash in
  XLA or a mixer, an out-of-memory kill) or one run exceeds `timeout_s` (a
  hang), that run is recorded as failed and a new child goes on with the
  rest. Returns the last child's exit code."""
  crashed: list[str] = []
  while True:
    child = subprocess.Popen([*worker_cmd, "--skip", ",".join(crashed)])
    rc, timed_out = _wait(child, out, timeout_s)
    if rc >= 0 or rc == -signal.SIGINT:
      return rc
    current = _running_in(out, child.pid)
    if current is None:
      raise RuntimeError(f"sweep worker died with {signal.Signals(-rc).name} "
                         "outside any run")
    name, entry = current
    why = (f"timed out after {timeout_s:g} s" if timed_out
           else f"process died with {signal.Signals(-rc).name}")
    entry.update(status=FAILED, error=f"{why} (stack in runs/{name}/{TRACEBACK})")
    state = _read_state(out)
    state[name] = entry
    _write_json(os.path.join(out, STATE), state)
    log(f"    {name}: {entry['error']}; continuing in a new process")
    crashed.append(name)
