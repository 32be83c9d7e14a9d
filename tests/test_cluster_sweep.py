"""Sweeps as cluster jobs (train/sweep_jobs.py) on submitit's local
executor: two workers, a failing and a crashing run recorded while the
others finish, the same sweep.json and tables, resumable."""

import json
import os
import signal

import pytest

from test_sweep import FakeTrainer, sweep_file
from train import configs, sweep, sweep_jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CrashingTrainer(FakeTrainer):
  """FakeTrainer that also kills its own process in the run named "crash"."""

  def __call__(self, cfg):
    if cfg.train.run_dir.endswith("crash"):
      os.kill(os.getpid(), signal.SIGKILL)
    return super().__call__(cfg)


def test_local_executor_two_workers_isolates_failures_and_resumes(tmp_path, monkeypatch):
  # the jobs are fresh interpreters that unpickle the trainer from this module
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]))
  path = sweep_file(tmp_path, "base: base.yaml\nvariants: [{name: a}, {name: boom}, "
                    "{name: crash}, {name: b}]\nexecutor: {name: local, workers: 2}\n")
  sw = sweep.load(path)
  assert sw.executor == sweep.Executor("local", 2)
  out, lines = str(tmp_path / "out"), []
  res = sweep_jobs.run(sw, out, sw.executor, run_fn=CrashingTrainer(fail=["boom"]),
                       log=lines.append, poll_s=0.2)
  state = json.load(open(os.path.join(out, sweep.STATE)))
  assert {n: e["status"] for n, e in state.items()} == {
      "a": "done", "boom": "failed", "crash": "failed", "b": "done"}
  assert "RuntimeError: boom in boom" in state["boom"]["error"]
  assert "RuntimeError: boom" in open(os.path.join(out, "runs", "boom", sweep.TRACEBACK)).read()
  assert state["crash"]["error"].startswith(f"job {state['crash']['job_id']} died:")
  assert len({e["job_id"] for e in state.values()}) == 4
  assert [r["status"] for r in res["rows"]] == ["done", "failed", "failed", "done"]
  assert os.path.exists(os.path.join(out, "results.md"))
  # never more than two in flight: the third is submitted after one finished
  order = [l.split(":")[0] + (":sub" if "submitted" in l else ":end") for l in lines]
  assert order[:2] == ["a:sub", "boom:sub"] and order[2].endswith(":end"), lines

  again = []
  sweep_jobs.run(sw, out, sw.executor, run_fn=CrashingTrainer(), log=again.append)
  assert not any("submitted" in l for l in again), again  # done and failed are kept


def test_bad_executor_sections_fail_at_load(tmp_path):
  for text, match in [("executor: {name: ray}\n", r"executor.name='ray' must be one of"),
                      ("executor: {name: local, workers: 0}\n", "executor.workers=0"),
                      ("executor: {name: local, gpus: 1}\n", r"unknown keys \['gpus'\]"),
                      ("executor: slurm\n", "must be a mapping")]:
    with pytest.raises(configs.ConfigError, match=match):
      sweep.load(sweep_file(tmp_path, "base: base.yaml\n" + text))
  sw = sweep.load(sweep_file(tmp_path, "base: base.yaml\nexecutor: {name: local, "
                             "params: {no_such_param: 1}}\n"))
  with pytest.raises(configs.ConfigError, match="executor.params=.*no_such_param"):
    sweep_jobs.make_executor(sw.executor, str(tmp_path / "f"), None)
