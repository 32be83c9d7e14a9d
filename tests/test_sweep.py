"""Sweeps: grid expansion, failures recorded, resume, results table, plots."""

import csv
import dataclasses
import json
import os
import sys

import pytest

from layers import mixers
from train import configs, plots, results, sweep
from trainer_fixtures import compile_cache  # noqa: F401

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")


def sweep_file(tmp_path, text):
  (tmp_path / "base.yaml").write_text(
      "model: {d_model: 32, n_layers: 1}\ntrain: {steps: 3}\n")
  (tmp_path / "mqar.yaml").write_text("include: base.yaml\ndata: {task: mqar}\n")
  (tmp_path / "text.yaml").write_text("include: base.yaml\ndata: {task: text}\n")
  (tmp_path / "wide.yaml").write_text("include: base.yaml\nmodel: {d_model: 48}\n")
  path = tmp_path / "sweep.yaml"
  path.write_text(text)
  return str(path)


GRID = """
base: base.yaml
overrides: [train.batch_size=2]
grid:
  task: [text.yaml, mqar.yaml]
  optimizer.lr: [1.0e-3, 3.0e-3]
variants:
  - {name: plain}
  - {files: [wide.yaml], model.n_layers: 2}
"""


class FakeTrainer:
  """Records calls; fails for the runs named in `fail`; writes a metrics log."""

  def __init__(self, fail=()):
    self.fail, self.calls = set(fail), []

  def __call__(self, cfg):
    name = os.path.basename(cfg.train.run_dir)
    self.calls.append(name)
    if name in self.fail:
      raise RuntimeError(f"boom in {name}")
    with open(os.path.join(cfg.train.run_dir, plots.METRICS), "w") as f:
      for step in (1, 2, 3):
        f.write(json.dumps({"step": step, "loss": 5.0 / step, "grad_norm": 1.0,
                            "step_time_s": 0.1, "tokens_per_s": 640.0}) + "\n")
    acc = cfg.optimizer.lr * 100 + cfg.model.d_model / 1000 + cfg.train.seed / 100
    s = {"params": 1000 * cfg.model.d_model, "tokens_per_s": 1e4 / cfg.model.n_layers,
         "step_time_s": 0.01, "val_loss": 2.0 - acc, "mfu": None,
         "peak_memory_bytes": None, "run_dir": cfg.train.run_dir}
    s.update({"val_accuracy": acc} if cfg.data.task == "mqar" else {"val_bpb": 3.0 - acc})
    return s


def test_grid_times_variants_expands_with_stable_names(tmp_path):
  sw = sweep.load(sweep_file(tmp_path, GRID))
  names = [v.name for v in sw.variants]
  assert len(names) == 8 and len(set(names)) == 8
  assert "text__lr=0.001__plain" in names
  assert "mqar__lr=0.003__wide__n_layers=2" in names
  cfg = sw.config(sw.variants[names.index("mqar__lr=0.003__wide__n_layers=2")])
  assert (cfg.data.task, cfg.optimizer.lr, cfg.model.d_model, cfg.model.n_layers,
          cfg.train.batch_size, cfg.train.steps) == ("mqar", 3e-3, 48, 2, 2, 3)
  assert sweep.load(sweep_file(tmp_path, GRID)).variants == sw.variants


def test_registered_axis_has_one_run_per_mixer(tmp_path):
  path = sweep_file(tmp_path, "base: base.yaml\ngrid:\n  mixer: registered\n")
  sw = sweep.load(path)
  assert [v.name for v in sw.variants] == mixers.names()
  assert [sw.config(v).model.mixer for v in sw.variants] == mixers.names()
  assert sw.config(sw.variants[0]).model.d_model == 32  # the base still applies
  with pytest.raises(configs.ConfigError, match="'mixer'.*list of paths or registered"):
    sweep.load(sweep_file(tmp_path, "grid:\n  mixer: {registered: ../mixers}\n"))
  with pytest.raises(configs.ConfigError, match="'task'.*list of paths, got 'registered'"):
    sweep.load(sweep_file(tmp_path, "grid:\n  task: registered\n"))


def test_mixer_options_give_registered_mixers_options(tmp_path):
  path = sweep_file(tmp_path, "base: base.yaml\ngrid:\n  mixer: registered\n"
                    "mixer_options:\n  rwkv6: {head_dim: 16}\n")
  sw = sweep.load(path)
  assert [v.name for v in sw.variants] == mixers.names()
  cfgs = {v.name: sw.config(v).model.mixer for v in sw.variants}
  assert cfgs["rwkv6"] == {"name": "rwkv6", "head_dim": 16}
  assert cfgs["gla"] == "gla"
  with pytest.raises(configs.ConfigError, match="unknown mixers \\['rwkv7'\\]"):
    sweep.load(sweep_file(tmp_path, "mixer_options: {rwkv7: {head_dim: 8}}\n"))
  with pytest.raises(configs.ConfigError, match="mapping from mixer names"):
    sweep.load(sweep_file(tmp_path, "mixer_options: [rwkv6]\n"))


def test_inline_base_and_list_values(tmp_path):
  path = sweep_file(tmp_path, """
base: {model: {d_model: 40}, train: {steps: 2}}
grid:
  model.mixer: [attention, [attention, {name: attention, num_kv_heads: 1}]]
""")
  sw = sweep.load(path)
  assert [v.name for v in sw.variants] == [
      "mixer=attention", "mixer=attention+attention-num_kv_heads1"]
  cfg = sw.config(sw.variants[1])
  assert cfg.model.d_model == 40 and cfg.train.steps == 2
  assert cfg.model.mixer_specs()[1] == ("attention", {"num_kv_heads": 1})


def test_bad_sweep_files_fail_fast(tmp_path):
  with pytest.raises(configs.ConfigError, match="unknown sweep keys.*'grdi'"):
    sweep.load(sweep_file(tmp_path, "grdi: {}\n"))
  with pytest.raises(configs.ConfigError, match="several runs are named"):
    sweep.load(sweep_file(tmp_path, "variants: [{name: a}, {name: a}]\n"))


def test_failure_recorded_sweep_continues_rerun_skips_done(tmp_path):
  sw = sweep.load(sweep_file(tmp_path, GRID))
  out = str(tmp_path / "out")
  bad = "text__lr=0.003__plain"
  first = FakeTrainer(fail=[bad])
  res = sweep.run_sweep(sw, out, run_fn=first, log=lambda _: None)
  assert len(first.calls) == 8
  state = json.load(open(os.path.join(out, sweep.STATE)))
  assert state[bad]["status"] == "failed" and "boom" in state[bad]["error"]
  assert "RuntimeError: boom" in open(os.path.join(out, "runs", bad, sweep.TRACEBACK)).read()
  assert sum(e["status"] == "done" for e in state.values()) == 7
  # The run record is the trainer's to write, after its resume check; the
  # sweep writes none (one that failed before training has none).
  assert not os.path.exists(os.path.join(out, "runs", bad, configs.FILENAME))
  assert {r["status"] for r in res["rows"]} == {"done", "failed"}

  second = FakeTrainer()
  sweep.run_sweep(sw, out, run_fn=second, log=lambda _: None)
  assert second.calls == []  # finished and failed runs are kept
  sweep.run_sweep(sw, out, run_fn=second, log=lambda _: None, retry_failed=True)
  assert second.calls == [bad]
  # changing the config of an existing run is refused, not silently mixed
  with pytest.raises(configs.ConfigError, match="different config"):
    sweep.run_sweep(sw, out, overrides=["train.steps=9"], run_fn=second, log=lambda _: None)


def test_only_runs_the_matching_runs_and_keeps_the_rest(tmp_path):
  sw = sweep.load(sweep_file(tmp_path, GRID))
  out = str(tmp_path / "out")
  first = FakeTrainer()
  res = sweep.run_sweep(sw, out, run_fn=first, log=lambda _: None,
                        only=["mqar__*__plain", "text__lr=0.001__*"])
  assert sorted(first.calls) == ["mqar__lr=0.001__plain", "mqar__lr=0.003__plain",
                                 "text__lr=0.001__plain",
                                 "text__lr=0.001__wide__n_layers=2"]
  assert sum(r["status"] == "done" for r in res["rows"]) == 4
  rest = FakeTrainer()  # a later call without `only` runs what is left
  sweep.run_sweep(sw, out, run_fn=rest, log=lambda _: None)
  assert len(rest.calls) == 4 and not set(rest.calls) & set(first.calls)


def test_results_table_blank_where_unknown_and_best_lr(tmp_path):
  sw = sweep.load(sweep_file(tmp_path, GRID + "best_lr: true\n"))
  out = str(tmp_path / "out")
  res = sweep.run_sweep(sw, out, run_fn=FakeTrainer(), log=lambda _: None)
  rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
  assert len(rows) == 8
  r = next(r for r in rows if r["run"] == "mqar__lr=0.003__plain")
  assert (r["task"], r["mixer"], r["d_model"], r["params"]) == ("mqar", "attention", "32", "32000")
  assert r["MFU"] == "" and r["peak mem (MiB)"] == "" and r["val bpb"] == ""
  assert float(r["val acc"]) == pytest.approx(0.3 + 0.032)
  md = open(os.path.join(out, "results.md")).read()
  assert md.startswith("| run | task | mixer |") and md.count("\n") == 10
  # best of lr: higher lr wins here for accuracy and for bpb, in each group
  best = [r["run"] for r in res["shown"]]
  assert sorted(best) == ["mqar__lr=0.003__plain", "mqar__lr=0.003__wide__n_layers=2",
                          "text__lr=0.003__plain", "text__lr=0.003__wide__n_layers=2"]
  assert os.path.exists(os.path.join(out, "results_best_lr.md"))
  for f in ("quality_vs_throughput.png", "loss_curves.png"):
    assert os.path.getsize(os.path.join(out, f)) > 10_000


def test_seed_axis_gives_mean_and_spread_in_the_caption(tmp_path):
  sw = sweep.load(sweep_file(tmp_path, """
base: base.yaml
grid:
  task: [text.yaml, mqar.yaml]
  optimizer.lr: [1.0e-3, 3.0e-3]
  train.seed: [0, 1, 3]
"""))
  out = str(tmp_path / "out")
  res = sweep.run_sweep(sw, out, run_fn=FakeTrainer(fail=["mqar__lr=0.001__seed=1"]),
                        log=lambda _: None)
  # one row per (task, lr): runs that differ in lr are never merged
  assert sorted((r["task"], r["metric"], r["seeds"]) for r in res["seeds"]) == [
      ("mqar", "val_accuracy", "0, 1, 3"), ("mqar", "val_accuracy", "0, 3"),
      ("text", "val_bpb", "0, 1, 3"), ("text", "val_bpb", "0, 1, 3")]
  r = next(r for r in res["seeds"] if r["seeds"] == "0, 3")   # mqar lr 1e-3: seed 1 failed
  assert r["runs"] == "mqar__lr=0.001__seed=0, mqar__lr=0.001__seed=3"
  assert r["mean"] == pytest.approx(0.1 + 0.032 + 0.015)
  assert r["spread"] == pytest.approx(0.03)
  assert "Seed noise on mqar: val_accuracy differs by up to 0.030" in res["caption"]
  assert "Seed noise on text: val_bpb differs by up to 0.030" in res["caption"]
  md = open(os.path.join(out, "results.md")).read()
  assert md.startswith(res["caption"]) and "| seed |" in md
  table = list(csv.DictReader(open(os.path.join(out, "results_over_seeds.csv"))))
  assert len(table) == 4 and {t["spread (max-min)"] for t in table} == {
      str(r["spread"]) for r in res["seeds"]}


def test_no_seed_table_without_repeated_seeds(tmp_path):
  sw = sweep.load(sweep_file(tmp_path, "base: base.yaml\ngrid:\n  train.seed: [0]\n"))
  res = sweep.run_sweep(sw, str(tmp_path / "out"), run_fn=FakeTrainer(), log=lambda _: None)
  assert res["seeds"] == [] and res["caption"] == ""
  assert not os.path.exists(tmp_path / "out" / "results_over_seeds.md")


def test_pareto_front():
  xs, ys = [1, 2, 3, 4, 2.5], [0.9, 0.8, 0.5, 0.1, 0.4]
  assert plots.pareto_front(xs, ys, higher_y=True) == [0, 1, 2, 3]
  assert plots.pareto_front(xs, ys, higher_y=False) == [3]
  assert results.quality({"val_loss": 1.0, "val_accuracy": None}) == ("val_loss", 1.0, False)


CRASHING_WORKER = """
import os, signal, sys, time
from train import sweep
sw_path, out = sys.argv[1:3]
skip = [s for s in sys.argv[sys.argv.index("--skip") + 1].split(",") if s]

def run(cfg):
  if cfg.train.run_dir.endswith("b"):
    os.kill(os.getpid(), signal.SIGSEGV)  # a hard crash, as in XLA or a kernel
  if cfg.train.run_dir.endswith("h"):
    time.sleep(600)  # a hang
  return {"params": 1, "val_loss": 1.0}

sweep.run_sweep(sweep.load(sw_path), out, run_fn=run, skip=skip, log=lambda _: None)
"""


def test_supervisor_records_crash_and_hang_and_goes_on(tmp_path, monkeypatch):
  path = sweep_file(tmp_path, "base: base.yaml\nvariants: [{name: a}, {name: b}, "
                    "{name: h}, {name: c}]\ntimeout_s: 4\n")
  out = str(tmp_path / "out")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.setenv("PYTHONPATH", repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  rc = sweep.supervise([sys.executable, "-c", CRASHING_WORKER, path, out], out,
                       sweep.load(path).timeout_s, log=lambda _: None)
  assert rc == 0
  state = json.load(open(os.path.join(out, sweep.STATE)))
  assert {n: e["status"] for n, e in state.items()} == {
      "a": "done", "b": "failed", "h": "failed", "c": "done"}
  assert "SIGSEGV" in state["b"]["error"]
  assert "timed out after 4 s" in state["h"]["error"]
  assert "in run" in open(os.path.join(out, "runs", "h", sweep.TRACEBACK)).read()
  tb = open(os.path.join(out, "runs", "b", sweep.TRACEBACK)).read()
  assert "Segmentation fault" in tb and "in run" in tb  # faulthandler's Python stack
  assert not os.path.exists(os.path.join(out, "runs", "a", sweep.TRACEBACK))


def test_main_job_loads_and_one_run_trains(tmp_path, compile_cache):
  """README command 1's sweep: every run's config is valid, MQAR and text
  both present, the text runs repeat a seed; one run trains 2 steps."""
  sw = sweep.load(os.path.join(ROOT, "sweeps", "default.yaml"))
  cfgs = {v.name: sw.config(v) for v in sw.variants}
  tasks = {c.data.task for c in cfgs.values()}
  assert tasks == {"mqar", "text"}
  text = [c for c in cfgs.values() if c.data.task == "text"]
  assert len({c.train.seed for c in text}) >= 2
  assert {results.mixer_label(c) for c in cfgs.values() if c.data.task == "mqar"} >= {
      "attention", "hyena", "s4d"}
  smoke = ["train.steps=2", "train.batch_size=2", "data.seq_len=16", "train.eval_every=2",
           "train.eval_batches=1", "train.checkpoint_every=2", "train.log_every=1"]
  one = dataclasses.replace(sw, variants=sw.variants[:1])
  [row] = sweep.run_sweep(one, str(tmp_path), overrides=smoke, log=lambda _: None)["rows"]
  assert row["status"] == "done" and row["val_loss"] is not None
