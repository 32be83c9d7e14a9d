"""`mixerlab` command line: train, eval, sweep, compile, bench, mixers.

    mixerlab train --config configs/tiny.yaml model.mixer=mamba optimizer.lr=1e-3
    mixerlab eval  --config runs/default/config.yaml
    mixerlab sweep --config configs/sweeps/default.yaml
    mixerlab compile --topology v5p:2x4x4 --config configs/tiny.yaml mesh.fsdp=8
    mixerlab bench --mixers attention,mamba --lengths 256,1024,4096
    mixerlab bench-moe --experts 8,16,32,64
    mixerlab bench-kernels --ops attention,scan --lengths 1024,4096
    mixerlab mixers

Trailing `key=value` arguments override config keys (train.configs). The
work happens in train.loop, train.sweep and train.bench; this module only
parses arguments and reports errors.

A user error (`ConfigError`: a bad config value, a missing or malformed
file; an OS error on a user path) prints one `mixerlab CMD: error: ...`
line and exits with 2, as argparse does; `--debug` (or MIXERLAB_DEBUG=1)
shows its traceback instead. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import typing

from train import configs


def _config_args(p: argparse.ArgumentParser, required: bool, what: str):
  p.add_argument("--config", action="append", default=[], required=required,
                 metavar="PATH", help=f"{what} (repeatable; merged in order)")
  p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                 help="config overrides, e.g. optimizer.lr=3e-4 "
                      "'model.mixer=[mamba,attention]'")


def _load(args) -> "configs.Config":
  return configs.load(args.config, args.overrides)


def _cluster_args(p: argparse.ArgumentParser):
  """Multi-host flags (train/distributed.py); without them the cluster is
  detected from the environment (SLURM, a TPU VM) or there is one process."""
  p.add_argument("--coordinator", metavar="HOST:PORT",
                 help="process 0's address, on every process")
  p.add_argument("--num-processes", type=int, metavar="N")
  p.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")


def _cluster(args):
  from train import distributed
  return distributed.Cluster(args.coordinator, args.num_processes, args.process_id)


def _join_cluster(args) -> None:
  from train import distributed
  distributed.initialize(_cluster(args))


def _cluster_flags(args) -> list[str]:
  return [a for flag in ("coordinator", "num_processes", "process_id")
          if getattr(args, flag) is not None
          for a in (f"--{flag.replace('_', '-')}", str(getattr(args, flag)))]


def cmd_train(args) -> int:
  cfg = _load(args)  # config errors first, before the trainer's heavy imports
  _join_cluster(args)
  from train import loop
  print(f"run dir: {cfg.train.run_dir}")  # the trainer writes its config.yaml
  print(json.dumps(loop.run(cfg), indent=1, default=str))
  return 0


def cmd_eval(args) -> int:
  cfg = _load(args)
  _join_cluster(args)
  from train import loop
  print(json.dumps(loop.evaluate(cfg), indent=1, default=str))
  return 0


def cmd_sweep(args) -> int:
  from train import sweep
  sw = sweep.load(args.config)  # a bad sweep file fails here, before any run
  if args.best_lr:
    sw = dataclasses.replace(sw, best_lr=True)
  if args.executor:
    sw = dataclasses.replace(sw, executor=dataclasses.replace(sw.executor,
                                                              name=args.executor))
  out = args.out or os.path.join(
      "runs", "sweeps", os.path.splitext(os.path.basename(args.config))[0])
  if sw.executor.name != "inprocess":  # each run a job; this process drives them
    from train import sweep_jobs
    return _report_sweep(sweep_jobs.run(sw, out, sw.executor, args.overrides,
                                        retry_failed=args.retry_failed,
                                       only=_globs(args.only)),
                       out)
  if args.skip is None:  # the supervisor: the runs happen in child processes
    _cluster(args)  # bad multi-host flags fail here, in one line
    for v in sw.variants:  # a bad run config fails here too, in one line
      sw.config(v, args.overrides)
    worker = [sys.executable, "-m", "train.cli", "sweep", "--config", args.config,
              "--out", out, *(["--best-lr"] if args.best_lr else []),
              *(["--retry-failed"] if args.retry_failed else []),
              *(["--only", args.only] if args.only else []),
              *(["--debug"] if args.debug else []), *_cluster_flags(args),
              *args.overrides]
    return sweep.supervise(worker, out, sw.timeout_s)
  _join_cluster(args)
  sweep.use_compile_cache(out)
  return _report_sweep(sweep.run_sweep(sw, out, args.overrides,
                                       skip=[s for s in args.skip.split(",") if s],
                                       retry_failed=args.retry_failed,
                                       only=_globs(args.only)),
                       out)


def _globs(text: str | None) -> list[str]:
  return [g for g in (text or "").split(",") if g]


def _report_sweep(res: dict, out: str) -> int:
  """Print a finished sweep's tables and files; 1 if any run is not done."""
  from train import results, sweep
  print("\n" + results.markdown(res["shown"], caption=res["caption"]))
  if res["seeds"]:
    print(results.markdown(res["seeds"], results.SEED_COLUMNS))
  failed = [r["run"] for r in res["rows"] if r["status"] != "done"]
  print("written:\n  " + "\n  ".join(res["files"]))
  if failed:
    print(f"{len(failed)} run(s) not done: {', '.join(failed)} "
          f"(errors in {os.path.join(out, sweep.STATE)})")
  return 1 if failed else 0


def cmd_compile(args) -> int:
  cfg = _load(args)
  from train import aot
  print(aot.compile_train_step(cfg, args.topology).text())
  return 0


def _bench_flags(p: argparse.ArgumentParser, spec_class):
  """One flag per field of a bench spec; tuples are comma-separated lists."""
  hints = typing.get_type_hints(spec_class)
  for f in dataclasses.fields(spec_class):
    ann, default = hints[f.name], f.default
    if typing.get_origin(ann) is tuple:
      item = typing.get_args(ann)[0]
      item = item if isinstance(item, type) else str  # mixers: names
      conv = lambda s, item=item: tuple(item(v) for v in s.split(",") if v)
      shown = ",".join(map(str, default))
    else:
      conv, shown = ann, default
    p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=conv,
                   default=default, metavar=f.name.upper(),
                   help=f.metadata["help"] + (f" (default: {shown})" if shown != "" else ""))


def _spec_fields(args, spec_class) -> dict:
  """A bench spec's fields from the flags `_bench_flags` made of them."""
  return {f.name: getattr(args, f.name) for f in dataclasses.fields(spec_class)}


def cmd_bench(args) -> int:
  from arches.lm import normalize_spec
  from layers import mixers
  from train.bench import mixers as bench
  fields = _spec_fields(args, bench.BenchSpec)
  config_args = [a for c in args.config for a in ("--config", c)] + args.overrides
  if args.config or args.overrides:  # bench the config's mixers at its width
    cfg = _load(args)
    specs = {json.dumps({"name": n, **o}, sort_keys=True) for n, o in cfg.model.mixer_specs()}
    fields.update(mixers=tuple(json.loads(s) for s in sorted(specs)),
                  d_model=cfg.model.d_model, dtype=cfg.model.dtype)
  try:  # BenchSpec's checks and the registry's are those of the flags
    spec = bench.BenchSpec(**fields)
    for m in spec.mixers:
      normalize_spec(m, mixers.REGISTRY)
  except (TypeError, ValueError) as e:
    raise configs.ConfigError(f"bench: {e}") from None
  cmd = bench.command(spec, config_args)
  print(cmd)
  bench.run(spec, cmd)
  print(open(os.path.join(spec.out, "bench.md")).read())
  print(f"written: {spec.out}/bench.json, bench.md, bench.png")
  return 0


def _run_bench(args, name: str, bench, spec_class) -> int:
  """`mixerlab <name>`: the spec from the flags (its checks are theirs), the
  command that reproduces it, the run and its markdown report."""
  try:
    spec = spec_class(**_spec_fields(args, spec_class))
  except ValueError as e:
    raise configs.ConfigError(f"{name}: {e}") from None
  cmd = bench.command(spec)
  print(cmd)
  bench.run(spec, cmd)
  print(open(os.path.join(spec.out, name.replace("-", "_") + ".md")).read())
  return 0


def cmd_bench_moe(args) -> int:
  from train.bench import moe
  return _run_bench(args, "bench-moe", moe, moe.MoEBenchSpec)


def cmd_bench_kernels(args) -> int:
  from train.bench import kernels
  return _run_bench(args, "bench-kernels", kernels, kernels.KernelBenchSpec)


def cmd_mixers(args) -> int:
  from train.bench import mixers as bench
  print(bench.mixer_table(args.d_model, args.length, args.batch))
  return 0


def positive(text: str) -> int:
  """An int >= 1 (argparse names this function in its error)."""
  value = int(text)
  if value < 1:
    raise ValueError(text)
  return value


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mixerlab", description=__doc__.split("\n\n")[0])
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--debug", action="store_true",
                      help="show the traceback of a user error (or MIXERLAB_DEBUG=1)")
  sub = p.add_subparsers(dest="command", required=True)
  add = functools.partial(sub.add_parser, parents=[common])
  s = add("train", help="train one model from config files")
  _config_args(s, True, "config file")
  _cluster_args(s)
  s.set_defaults(func=cmd_train)
  s = add("eval", help="evaluate a run's latest checkpoint")
  _config_args(s, True, "config file (e.g. a run's config.yaml)")
  _cluster_args(s)
  s.set_defaults(func=cmd_eval)
  s = add("sweep", help="run a sweep file; resumable; writes tables and plots")
  s.add_argument("--config", required=True, metavar="PATH",
                 help="the sweep file (see train/sweep.py)")
  s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                 help="config overrides for every run")
  s.add_argument("--out", help="sweep directory (default runs/sweeps/<sweep name>)")
  s.add_argument("--best-lr", action="store_true",
                 help="also tabulate/plot the best learning rate per setting")
  s.add_argument("--retry-failed", action="store_true",
                 help="run failed runs again (finished ones are always kept)")
  s.add_argument("--only", metavar="GLOBS",
                 help="run only the runs whose names match one of these "
                 "comma-separated glob patterns (others are left as they are)")
  from train.sweep import EXECUTORS
  s.add_argument("--executor", choices=EXECUTORS,
                 help="run each variant as a submitit job (local or slurm) instead "
                      "of in a supervised worker; overrides the sweep file's "
                      "executor.name (see train/sweep_jobs.py)")
  s.add_argument("--skip", help=argparse.SUPPRESS)  # set by the supervisor for its worker
  _cluster_args(s)
  s.set_defaults(func=cmd_sweep)
  s = add("compile", help="compile the train step ahead of time for a TPU pod "
          "topology (needs libtpu, no TPU) and report per-device memory")
  _config_args(s, True, "config file")
  s.add_argument("--topology", required=True, metavar="PLATFORM:SHAPE",
                 help="e.g. v5p:2x4x4 (a v5p-64 slice: 32 chips), v5e:4x4, or cpu:8")
  s.set_defaults(func=cmd_compile)
  s = add("bench", help="time/memory vs sequence length, decode vs context")
  _config_args(s, False, "bench the mixers of this config at its width and dtype")
  from train.bench.mixers import BenchSpec
  _bench_flags(s, BenchSpec)
  s.set_defaults(func=cmd_bench)
  s = add("bench-moe", help="MoE layer time/memory vs number of experts at fixed "
          "active parameters")
  from train.bench.moe import MoEBenchSpec
  _bench_flags(s, MoEBenchSpec)
  s.set_defaults(func=cmd_bench_moe)
  s = add("bench-kernels", help="Pallas kernels against their baselines: time, "
          "TFLOP/s and ratio vs length and head dim")
  from train.bench.kernels import KernelBenchSpec
  _bench_flags(s, KernelBenchSpec)
  s.set_defaults(func=cmd_bench_kernels)
  s = add("mixers", help="list registered mixers with size and forward time")
  s.add_argument("--d-model", type=positive, default=64)
  s.add_argument("--length", type=positive, default=256)
  s.add_argument("--batch", type=positive, default=4)
  s.set_defaults(func=cmd_mixers)
  return p


# User errors: the project's ConfigError (bad values, missing or malformed
# files), and OS errors on user paths (a run_dir on a full or read-only disk).
USER_ERRORS = (configs.ConfigError, OSError)


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  try:
    return args.func(args)
  except USER_ERRORS as e:  # the message, not a traceback
    if args.debug or os.environ.get("MIXERLAB_DEBUG", "") not in ("", "0"):
      raise
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    print(f"mixerlab {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
