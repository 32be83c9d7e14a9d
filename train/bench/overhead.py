"""Trainer overhead: the steady-state step of `train.loop` against a bare
jitted loss + grad + update loop of the same model and optimizer.

    python -m train.bench.overhead [--d-model 128 --layers 2 --seq-len 128 ...]

The bare loop feeds one device-resident batch and reads nothing back until
the end: the floor. The trainer pays for what a real run needs (a host
batch shipped per step, every loss read back and checked, logging). Both
are timed over the same number of steps after warm-up, in interleaved
repeats (drifting load hits both); the least-disturbed repeat of each is
compared, since noise only adds time. On a CPU backend, where the host and
the "device" share cores, process CPU time per step is reported too: it is
what other processes' load disturbs least.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time

import jax
import numpy as np
import optax

from arches.lm import LMConfig
from train.config import Config, DataConfig, OptimizerConfig, TrainConfig
from train.loop import Trainer
from train.trainer.metrics import RunLog
from train.trainer.sharding import shard_batch
from train.trainer.state import Setup, build
from train.trainer.step import forward, masked_nll


class RepeatBatch:
  """The data-iterator API over one host batch, so data loading cost is
  not part of what is measured."""

  def __init__(self, batch: dict):
    self.batch, self.pos = batch, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    self.pos += 1
    return self.batch

  def get_state(self) -> dict:
    return {"pos": self.pos}

  def set_state(self, state: dict):
    self.pos = state["pos"]


def host_batch(cfg: Config) -> dict:
  rng = np.random.default_rng(0)
  B, L, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  tokens = rng.integers(0, V, (B, L + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((B, L), np.float32)}


def _clocks():
  return np.array([time.perf_counter(), time.process_time()])


def make_bare_loop(setup: Setup):
  """run(batch, steps) -> (wall, cpu) seconds per step of the plain loop;
  compiled once, its state carried from call to call. Same loss as the
  trainer's, so only the loop around it differs."""
  state = setup.init_state()
  graphdef, buffers, tx = setup.graphdef, state.buffers, setup.tx

  def loss_fn(params, b):
    nll, count = masked_nll(forward(graphdef, params, buffers, b), b)
    return nll / count

  def step(params, opt_state, b):
    loss, grads = jax.value_and_grad(loss_fn)(params, b)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  carry = [state.params, state.opt_state]

  def run(batch: dict, steps: int) -> np.ndarray:
    params, opt_state = carry
    t0 = _clocks()
    for _ in range(steps):
      params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready(loss)
    carry[:] = params, opt_state
    return (_clocks() - t0) / steps

  return run


@contextlib.contextmanager
def trainer_loop(cfg: Config, host: dict, run_dir: str):
  """Yields run(steps) -> (wall, cpu) seconds per step of `Trainer.fit`,
  the trainer's own loop, continuing one run chunk by chunk."""
  trainer = Trainer(cfg, RepeatBatch(host), [host])
  state, done, _ = trainer.restore_or_init()
  log = RunLog(run_dir, start_step=0, total_steps=cfg.train.steps)
  carry = [state, done]

  def run(steps: int) -> np.ndarray:
    state, done = carry
    t0 = _clocks()
    state = trainer.fit(state, done, log, stop=done + steps)
    carry[:] = state, done + steps
    return (_clocks() - t0) / steps

  try:
    yield run
  finally:
    trainer.ckpt.wait()  # the last chunk ends the run with a save
    trainer.ckpt.close()
    log.close()


def bench_config(args, total_steps: int) -> Config:
  return Config(
      model=LMConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers,
                     dtype=args.dtype),
      data=DataConfig(task="text", seq_len=args.seq_len),
      optimizer=OptimizerConfig(warmup_steps=2),
      train=TrainConfig(steps=total_steps, batch_size=args.batch_size,
                        eval_every=total_steps, eval_batches=1, log_every=total_steps,
                        checkpoint_every=total_steps))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--d-model", type=int, default=128)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--steps", type=int, default=20, help="per timed repeat")
  p.add_argument("--repeats", type=int, default=4)
  p.add_argument("--dtype", default="float32")
  args = p.parse_args(argv)
  chunks = args.repeats + 1  # the first of each loop is warm-up (and compile)
  cfg = bench_config(args, total_steps=chunks * args.steps)
  host = host_batch(cfg)
  with tempfile.TemporaryDirectory() as run_dir:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=run_dir))
    with trainer_loop(cfg, host, run_dir) as trainer_run:
      setup = build(cfg)
      bare_run, device_batch = make_bare_loop(setup), shard_batch(host, setup.mesh)
      bare, trainer = [], []
      for _ in range(chunks):
        bare.append(bare_run(device_batch, args.steps))
        trainer.append(trainer_run(args.steps))
  bare, trainer = np.min(bare[1:], axis=0), np.min(trainer[1:], axis=0)
  overhead = trainer / bare - 1.0
  out = {"device": jax.devices()[0].device_kind, "config": vars(args),
         "bare_step_s": bare[0], "trainer_step_s": trainer[0], "overhead": overhead[0],
         "bare_cpu_s": bare[1], "trainer_cpu_s": trainer[1], "overhead_cpu": overhead[1]}
  line = (f"device {out['device']}: bare {bare[0] * 1e3:.2f} ms/step, trainer "
          f"{trainer[0] * 1e3:.2f} ms/step: overhead {overhead[0]:+.1%} (budget +5%)")
  if jax.default_backend() == "cpu":
    line += (f"; CPU time bare {bare[1] * 1e3:.2f} ms/step, trainer "
             f"{trainer[1] * 1e3:.2f} ms/step: overhead {overhead[1]:+.1%}")
  print(line)
  return out


if __name__ == "__main__":
  main()
