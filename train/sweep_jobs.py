"""Sweeps on a cluster: each variant an independent job, through submitit.

A sweep file's `executor:` section (or `mixerlab sweep --executor`) picks
where the runs go:

    executor:
      name: slurm        # inprocess (default: train/sweep.py's supervised
                         # worker) | local (subprocesses here) | slurm
      workers: 8         # jobs in flight at once
      params:            # passed to submitit's AutoExecutor.update_parameters
        slurm_partition: gpu
        gpus_per_node: 8
        timeout_min: 120

This process stays the driver: it submits up to `workers` jobs, records
each job's outcome in the same <out>/sweep.json as the in-process sweep
(so a re-invocation skips done and failed runs and resubmits interrupted
ones, which resume from their checkpoints), and writes the same tables. A
run that raises is recorded by the job itself (traceback in the run's
traceback.txt); a job that dies (a segfault, an out-of-memory kill, SLURM's
time limit) is recorded from submitit's error, and the others go on.
submitit's logs and pickles are under <out>/submitit/.

A job with several tasks (SLURM `tasks_per_node`/`nodes` > 1, one task per
host or GPU) joins them with jax.distributed from SLURM's variables
(train/distributed.py), so one variant can span hosts.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

from arches.validation import ConfigError
from train import sweep as sweeps
from train.config import Config

def run_job(cfg: Config, out: str, run_fn: Callable[[Config], dict]) -> dict:
  """One variant, inside its job: the outcome entry (status, summary or
  error). A multi-task SLURM job first joins its tasks."""
  from train import distributed
  distributed.initialize()
  sweeps.use_compile_cache(out)
  entry = {"started": time.time()}
  sweeps.attempt(cfg, run_fn, entry, print)
  return entry


def make_executor(executor: sweeps.Executor, folder: str, timeout_s: float | None):
  import submitit
  ex = submitit.AutoExecutor(folder=folder, cluster=executor.name)
  params = dict(executor.params)
  if timeout_s is not None:
    params.setdefault("timeout_min", math.ceil(timeout_s / 60))
  try:
    ex.update_parameters(**params)
  except (ValueError, NameError, TypeError) as e:
    raise ConfigError(f"executor.params={dict(executor.params)}: {e}") from None
  return ex


def run(sweep: sweeps.Sweep, out: str, executor: sweeps.Executor, overrides: Sequence[str] = (),
        run_fn: Callable[[Config], dict] = sweeps.trainer_run,
        log: Callable[[str], None] = print, retry_failed: bool = False,
        poll_s: float = 1.0, only: Sequence[str] = ()) -> dict:
  """Run the variants `sweep.plan` gives as jobs of `executor`, at most
  executor.workers at once, then write the tables (sweep.tables)."""
  cfgs, state, todo = sweeps.plan(sweep, out, overrides, retry_failed=retry_failed,
                                  log=log, only=only)
  ex = make_executor(executor, os.path.join(out, "submitit"), sweep.timeout_s)
  queue, running = list(todo), {}
  while queue or running:
    while queue and len(running) < executor.workers:
      v = queue.pop(0)
      job = ex.submit(run_job, cfgs[v.name], out, run_fn)
      log(f"{v.name}: submitted as job {job.job_id}")
      sweeps.mark_running(state, out, v, cfgs[v.name], job_id=str(job.job_id))
      running[v.name] = job
    finished = [name for name, job in running.items() if job.done()]
    for name in finished:
      job, entry = running.pop(name), state[name]
      try:
        entry.update(job.result())
      except Exception as e:  # the job died: submitit's error says how
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        entry.update(status=sweeps.FAILED,
                     error=f"job {job.job_id} died: {type(e).__name__}: {first} "
                           f"(logs in {job.paths.folder})")
      log(f"{name}: {entry['status']}" + (f": {entry['error']}" if "error" in entry else ""))
      sweeps.write_state(state, out)
    if running and not finished:
      time.sleep(poll_s)
  return sweeps.tables(sweep, cfgs, state, out)
