"""Tiny configs and an in-memory data iterator with the train.data API
(dict batches, get_state/set_state), shared by the trainer tests."""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np
import pytest

from arches.lm import LMConfig
from train.config import Config, DataConfig, OptimizerConfig, TrainConfig

VOCAB, SEQ, BATCH = 64, 32, 8


class ToyIter:
  """Arithmetic sequences mod VOCAB (learnable, so loss falls); batch i is
  a pure function of (seed, i), and the state is i. `nan_mask_at`: that
  batch's loss_mask holds a NaN, to drive the non-finite-loss path."""

  def __init__(self, batch_size: int = BATCH, seq_len: int = SEQ, *, seed: int = 0,
               nan_mask_at: int | None = None, segments: bool = False):
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.nan_mask_at, self.segments, self.pos = nan_mask_at, segments, 0

  def __iter__(self):
    return self

  def batch(self, i: int) -> dict:
    rng = np.random.default_rng([self.seed, i])
    B, L = self.batch_size, self.seq_len
    start = rng.integers(0, VOCAB, (B, 1))
    stride = rng.integers(1, 4, (B, 1))
    seq = (start + stride * np.arange(L + 1)) % VOCAB
    mask = (rng.random((B, L)) < 0.9).astype(np.float32)
    if i == self.nan_mask_at:
      mask[0, 0] = np.nan
    out = {"inputs": seq[:, :-1].astype(np.int32),
           "targets": seq[:, 1:].astype(np.int32), "loss_mask": mask}
    if self.segments:
      out["segment_ids"] = (np.arange(L)[None] >= L // 2).astype(np.int32).repeat(B, 0) + 1
    return out

  def __next__(self) -> dict:
    out = self.batch(self.pos)
    self.pos += 1
    return out

  def get_state(self) -> dict:
    return {"pos": self.pos}

  def set_state(self, state: dict):
    self.pos = int(state["pos"])


def eval_batches(batch_size: int = BATCH, n: int = 2) -> list[dict]:
  it = ToyIter(batch_size, seed=12345)
  return [next(it) for _ in range(n)]


def tiny_config(run_dir: str, **train) -> Config:
  """Evaluates and checkpoints at the last step only, unless told otherwise."""
  opts = dict(steps=8, batch_size=BATCH, log_every=1, eval_batches=2, run_dir=run_dir)
  opts.update(train)
  opts.setdefault("eval_every", opts["steps"])
  opts.setdefault("checkpoint_every", opts["steps"])
  return Config(model=LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2),
                data=DataConfig(task="selective_copy", seq_len=SEQ, vocab_size=VOCAB),
                optimizer=OptimizerConfig(lr=1e-2, warmup_steps=2),
                train=TrainConfig(**opts))


_CACHE_DIR = []


def xla_cache_dir() -> str:
  """One temporary directory per test process (a fixture imported into
  several test modules would be one per module), removed at exit."""
  if not _CACHE_DIR:
    import atexit
    import shutil
    import tempfile
    _CACHE_DIR.append(tempfile.mkdtemp(prefix="mixerlab-xla-cache-"))
    atexit.register(shutil.rmtree, _CACHE_DIR[0], True)
  return _CACHE_DIR[0]


@pytest.fixture(scope="module")
def compile_cache():
  """A persistent XLA cache for the trainer tests and their subprocesses:
  the tiny model's init, train and eval steps compile once per session, not
  once per test (XLA:CPU compiles of random inits are slow). Switched off
  after the module so other tests see JAX's defaults."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  jax.config.update("jax_compilation_cache_dir", xla_cache_dir())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield xla_cache_dir()
  jax.config.update("jax_compilation_cache_dir", None)
  cc.reset_cache()


def cache_env(cache_dir: str) -> dict:
  """Environment for a subprocess that shares the persistent cache."""
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@contextlib.contextmanager
def count_compiles():
  """Collects every XLA compile request in the block: backend compiles and
  persistent-cache lookups (a cache hit skips the backend compile)."""
  seen = []
  def on_event(event, **kw):
    if event == "/jax/compilation_cache/compile_requests_use_cache":
      seen.append(event)
  def on_duration(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      seen.append(event)
  jax.monitoring.register_event_listener(on_event)
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_listener(on_event)
    jax.monitoring.unregister_event_duration_listener(on_duration)


KILL_CFG = dict(steps=12, checkpoint_every=3, eval_every=4)


def _die_during_save(checkpoint_dir: str, step: int):
  """SIGKILL this process once orbax's temporary directory for `step`
  exists, i.e. while that checkpoint is being written."""
  import signal
  import threading
  import time

  def watch():
    while True:
      if os.path.isdir(checkpoint_dir) and any(
          n.startswith(f"{step}.") and "tmp" in n for n in os.listdir(checkpoint_dir)):
        os.kill(os.getpid(), signal.SIGKILL)
      time.sleep(0.0005)

  threading.Thread(target=watch, daemon=True).start()


def main(argv):
  """Subprocess entry: train KILL_CFG in run_dir, optionally dying mid-save.
  python tests/trainer_fixtures.py RUN_DIR [DIE_DURING_SAVE_OF_STEP]"""
  from train.loop import train
  run_dir = argv[0]
  if len(argv) > 1:
    _die_during_save(os.path.join(run_dir, "checkpoints"), int(argv[1]))
  train(tiny_config(run_dir, **KILL_CFG), ToyIter(), eval_batches(),
        data_info={"corpus_fingerprint": "toy"})


if __name__ == "__main__":
  import sys
  main(sys.argv[1:])
