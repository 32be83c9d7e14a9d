"""The `mixerlab` command line: help for each subcommand, errors, a tiny run."""

import json
import os
import subprocess
import sys

import pytest

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


def test_config_error_is_a_message_not_a_traceback(capsys):
  code = cli.main(["train", "--config", os.path.join(REPO, "configs", "tiny.yaml"),
                   "optimizer.lrr=1e-3"])
  err = capsys.readouterr().err
  assert code == 2
  assert "unknown key 'optimizer.lrr'" in err and "Did you mean 'optimizer.lr'" in err


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
