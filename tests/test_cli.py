"""The `mixerlab` command line: help for each subcommand, errors, a tiny run."""

import json
import os
import re
import subprocess
import sys

import pytest

from arches.validation import ConfigError
from train import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCOMMANDS = ("train", "eval", "sweep", "bench", "mixers")


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_each_subcommand_has_help(sub, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([sub, "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: mixerlab {sub}")


def test_top_level_help_lists_subcommands(capsys):
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  out = capsys.readouterr().out
  assert all(s in out for s in SUBCOMMANDS)


TINY = os.path.join(REPO, "configs", "tiny.yaml")
# A new user's malformed inputs (issue 11): (extra arguments, what the one
# error line must name). "{tmp}" is a folder holding the files below.
MALFORMED = [
    (["train.stepz=3"], "unknown key 'train.stepz'. Did you mean 'train.steps'"),
    (["model.mixer=mambaa"], "model.mixer: unknown sequence mixer 'mambaa'. Did you mean 'mamba'"),
    (["model.mixer={name: attention, num_head: 2}"], "model.mixer: .*no option 'num_head'"),
    (["model.d_model=-8"], "model.d_model=-8 must be >= 1"),
    (["model.d_model=0"], "model.d_model=0 must be >= 1"),
    (["model.n_layers=0"], "model.n_layers=0 must be >= 1"),
    (["train.steps=0"], "train.steps=0 must be >= 1"),
    (["train.steps=-1"], "train.steps=-1 must be >= 1"),
    (["train.eval_every=-5"], "train.eval_every=-5 must be >= 1"),
    (["train.log_every=0"], "train.log_every=0 must be >= 1"),
    (["optimizer.lr=-1e-3"], "optimizer.lr=-0.001 must be > 0"),
    (["data.task=qa"], "data.task='qa' must be one of text, mqar"),
    (["optimizer.name=sgd"], "optimizer.name='sgd' must be one of adamw, lion"),
    (["optimizer.schedule=step"], "optimizer.schedule='step' must be one of cosine"),
    (["data.val_fraction=0"], r"data.val_fraction=0.0 must be in \(0, 1\)"),
    (["data.val_fraction=1.5"], r"data.val_fraction=1.5 must be in \(0, 1\)"),
    (["data.path={tmp}/missing.txt"], "data.path='.*missing.txt' does not exist"),
    (["data.path={tmp}/empty.txt"], "data.path='.*empty.txt': the corpus is empty"),
    (["--config", "{tmp}/broken.yaml"],
     "broken.yaml: YAML syntax error at line 3, column 1: did not find expected ',' or ']' "
     r"\(while parsing a flow sequence at line 2, column 10\)"),
    (["data.task=mqar", "data.num_kv_pairs=8", "data.seq_len=16"],
     r"data.seq_len=16 must be >= 4 \* num_kv_pairs = 32"),
    (["train.grad_accum=3"], "train.batch_size from .*tiny.yaml; train.grad_accum from "
     "command-line override: train.batch_size=16 must be divisible by train.grad_accum=3"),
    (["model.mixer="], "model.mixer is empty"),
    (["model.dtype=float64"], "model.dtype='float64' must be one of float32, bfloat16"),
    (["--config", "{tmp}/nonexistent.yaml"], "config file '.*nonexistent.yaml' does not exist"),
    (["train.steps"], "override 'train.steps' must look like key=value"),
    (["model.mixer=[attention,mamba"], "override 'model.mixer=.*': YAML syntax error"),
    (["train.run_dir={tmp}/empty.txt", "model.d_model=8", "model.n_layers=1",
      "data.seq_len=8", "train.batch_size=2", "train.eval_batches=1"],
     "train.run_dir='.*empty.txt' is a file, not a directory"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("inputs")
  (tmp / "empty.txt").write_text("")
  (tmp / "broken.yaml").write_text("model:\n  mixer: [attention, mamba\n")
  (tmp / "bad_runs.yaml").write_text(f"base: {TINY}\noverrides: [train.steps=0]\n")
  return tmp


def _error_line(capsys, command: str) -> str:
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"mixerlab {command}: error: "), err
  return lines[0]


@pytest.mark.parametrize("args, match", MALFORMED, ids=[" ".join(a) for a, _ in MALFORMED])
def test_malformed_input_is_one_error_line(args, match, files, capsys, monkeypatch):
  monkeypatch.delenv("MIXERLAB_DEBUG", raising=False)
  args = [a.replace("{tmp}", str(files)) for a in args]
  code = cli.main(["train", "--config", TINY, f"train.run_dir={files}/run", *args])
  assert code == 2
  assert re.search(match, _error_line(capsys, "train"))


@pytest.mark.parametrize("argv, match", [
    (["sweep", "--config", "{tmp}/broken.yaml"], "broken.yaml: YAML syntax error at line 3"),
    (["sweep", "--config", "{tmp}/nonexistent.yaml"], "sweep file .* does not exist"),
    (["sweep", "--config", "{tmp}/bad_runs.yaml"], "train.steps=0 must be >= 1"),
    (["eval", "--config", TINY, "model.n_layers=0"], "model.n_layers=0 must be >= 1"),
    (["bench", "--mixers", "mambaa"], "unknown sequence mixer 'mambaa'"),
    (["bench", "--fit", "1,2,3"], "fit must be two lengths"),
], ids=lambda x: x[0] if isinstance(x, list) else None)
def test_every_subcommand_reports_user_errors_in_one_line(argv, match, files, capsys):
  code = cli.main([a.replace("{tmp}", str(files)) for a in argv])
  assert code == 2
  assert re.search(match, _error_line(capsys, argv[0]))


def test_debug_shows_the_traceback(monkeypatch):
  with pytest.raises(ConfigError, match="train.steps=0"):
    cli.main(["train", "--debug", "--config", TINY, "train.steps=0"])
  monkeypatch.setenv("MIXERLAB_DEBUG", "1")
  with pytest.raises(ConfigError, match="train.steps=0"):
    cli.main(["train", "--config", TINY, "train.steps=0"])


@pytest.mark.parametrize("bug", [RuntimeError, ValueError])
def test_a_bug_keeps_its_traceback(bug, monkeypatch, tmp_path):
  from train import loop

  def broken(cfg):
    raise bug("a bug, not a user error")
  monkeypatch.setattr(loop, "run", broken)
  with pytest.raises(bug, match="a bug"):
    cli.main(["train", "--config", TINY, f"train.run_dir={tmp_path}"])


def test_train_tiny_run_in_subprocess(tmp_path):
  pytest.importorskip("train.loop")
  run_dir = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run(
      [sys.executable, "-m", "train.cli", "train",
       "--config", os.path.join(REPO, "configs", "tiny.yaml"),
       "model.d_model=16", "model.n_layers=1", "data.seq_len=16", "train.batch_size=2",
       "train.steps=2", "train.eval_every=2", "train.eval_batches=1", "train.log_every=1",
       "train.checkpoint_every=2", f"train.run_dir={run_dir}"],
      capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert summary["params"] > 0 and summary["val_loss"] > 0
  assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()
