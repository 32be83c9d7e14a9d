"""Checkpoints: round trip, keep-last-K, a run killed at any moment
(mid-save included) that resumes onto the uninterrupted loss curve, and a
damaged newest checkpoint that falls back to the previous one."""

import glob
import json
import logging
import os
import shutil
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from trainer_fixtures import (KILL_CFG, ToyIter, cache_env, compile_cache,  # noqa: F401
                              eval_batches, tiny_config)
from arches.validation import ConfigError
from train.trainer.checkpoint import DAMAGED, Checkpointer
from train.loop import train
from train.trainer.state import build

pytestmark = pytest.mark.usefixtures("compile_cache")
CHILD = os.path.join(os.path.dirname(__file__), "trainer_fixtures.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_round_trip_keeps_last_k(tmp_path):
  setup = build(tiny_config(str(tmp_path)))
  state = setup.init_state()
  ckpt = Checkpointer(str(tmp_path / "ck"), keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state.replace(step=state.step + step), {"pos": step})
  ckpt.wait()
  assert ckpt.manager.all_steps() == [2, 3] and ckpt.latest_step() == 3
  restored, data_state = ckpt.restore(3, setup.abstract_state)
  assert data_state == {"pos": 3} and int(restored.step) == 3
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state.replace(step=state.step + 3))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding
  ckpt.close()
  with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
    Checkpointer(str(tmp_path / "ck2"), keep=0)


def _losses(run_dir):
  """{(step, key): value} of every loss in metrics.jsonl."""
  out = {}
  for line in open(os.path.join(run_dir, "metrics.jsonl")):
    r = json.loads(line)
    for key in ("loss", "val_loss"):
      if key in r:
        assert (r["step"], key) not in out, f"step {r['step']} logged twice"
        out[r["step"], key] = r[key]
  return out


def _child(run_dir, cache_dir, *args):
  return subprocess.Popen([sys.executable, CHILD, run_dir, *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=ROOT,
                          env={**cache_env(cache_dir), "PYTHONPATH": ROOT})


def _kill_after_step(proc, step: int, delay: float):
  """SIGKILL `proc` `delay` seconds after it logs `step`."""
  for line in proc.stdout:
    if line.startswith(f"step {step}:"):
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      break
  return proc.wait(timeout=300)


def test_killed_runs_resume_onto_the_uninterrupted_curve(tmp_path, compile_cache):
  cfg = tiny_config(str(tmp_path / "ref"), **KILL_CFG)
  train(cfg, ToyIter(), eval_batches(), data_info={"corpus_fingerprint": "toy"})
  run_dir = str(tmp_path / "run")
  ckpt_dir = os.path.join(run_dir, "checkpoints")

  # 1. Killed while writing the step-6 checkpoint: step 3 stays the latest.
  proc = _child(run_dir, compile_cache, 6)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == -signal.SIGKILL, out
  assert any("tmp" in n for n in os.listdir(ckpt_dir)), os.listdir(ckpt_dir)
  assert Checkpointer(ckpt_dir, keep=2, read_only=True).latest_step() == 3

  # 2. Restarted, then killed at a random moment after a random step.
  seed = random.randrange(1 << 30)
  rnd = random.Random(seed)
  step, delay = rnd.randint(7, 11), rnd.uniform(0.0, 0.05)
  proc = _child(run_dir, compile_cache)
  assert _kill_after_step(proc, step, delay) == -signal.SIGKILL, (seed, step)

  # 3. Restarted in-process to the end.
  train(tiny_config(run_dir, **KILL_CFG), ToyIter(), eval_batches(),
        data_info={"corpus_fingerprint": "toy"})
  ref, got = _losses(str(tmp_path / "ref")), _losses(run_dir)
  assert got.keys() == ref.keys(), (seed, sorted(set(ref) ^ set(got)))
  for k in ref:
    assert abs(got[k] - ref[k]) <= 1e-6, (seed, k, got[k], ref[k])


def _truncate_arrays(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files, os.listdir(step_dir)
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


# A failed orbax read leaves a coroutine behind that finds its event loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  run_dir = str(tmp_path / "run")
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  cfg = tiny_config(run_dir, **KILL_CFG)  # the kill test's programs, from the cache
  toy = {"corpus_fingerprint": "toy"}
  train(cfg, ToyIter(), eval_batches(), data_info=toy)
  ref = _losses(run_dir)
  assert sorted(os.listdir(ckpt_dir)) == ["12", "9"]
  _truncate_arrays(os.path.join(ckpt_dir, "12"))
  # and a temporary left by a save killed midway, which is never a step
  os.makedirs(os.path.join(ckpt_dir, "15.orbax-checkpoint-tmp-1"))

  with caplog.at_level(logging.WARNING, logger="mixerlab.checkpoint"):
    train(cfg, ToyIter(), eval_batches(), data_info=toy)
  assert "checkpoint step 12" in caplog.text and "cannot be read" in caplog.text
  got = _losses(run_dir)  # steps 10-12 and the final eval, retrained from step 9
  assert got.keys() == ref.keys()
  for k in ref:
    assert abs(got[k] - ref[k]) <= 1e-6, (k, got[k], ref[k])
  events = [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
            if "event" in r]
  assert [(e["step"], list(e["unreadable_checkpoints"])) for e in events] == [(9, ["12"])]
  assert [n.split(".")[0] for n in os.listdir(os.path.join(run_dir, DAMAGED))] == ["12"]
  assert sorted(os.listdir(ckpt_dir)) == ["12", "9"]

  # With no readable checkpoint left: a clear error, and nothing moved.
  _truncate_arrays(os.path.join(ckpt_dir, "12"))
  shutil.rmtree(os.path.join(ckpt_dir, "9", "state"))
  with pytest.raises(ConfigError, match="no checkpoint in .* can be read: step 12: .*; step 9"):
    train(cfg, ToyIter(), eval_batches(), data_info=toy)
  assert sorted(os.listdir(ckpt_dir)) == ["12", "9"]
