"""The training run: `run(cfg)` trains with periodic eval and checkpoints
and returns a summary; `evaluate(cfg)` scores the latest checkpoint.

    summary = run(Config(model=LMConfig(d_model=64), train=TrainConfig(steps=500)))

run_dir gets config.yaml (the run record: the resolved config, written
once the resume check has passed; `configs.load` reads it back), data.json
(data.describe: task, sizes, the corpus fingerprint), metrics.jsonl, tb/
(TensorBoard), checkpoints/ and summary.json. Starting a run whose run_dir
holds checkpoints resumes from the latest readable one (train/trainer/checkpoint.py):
parameters, optimizer, step, rng and data position, so the loss curve
continues as if never interrupted. train/trainer/rundir.py says what may change on
resume; the changes allowed are logged to metrics.jsonl as a "resume"
event at the step resumed from (they apply from the next step on).

The host never waits on the step it just dispatched: it pulls and ships the
next batch, then reads the previous step's loss. Every loss is checked; a
non-finite one stops the run before any later checkpoint is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from train import configs, data, distributed
from train.trainer import rundir
from train.trainer import eval as evaluation
from train.trainer.checkpoint import Checkpointer
from train.config import Config
from train.trainer.metrics import RunLog, StepTimer, aux_summary, mfu, peak_memory_bytes
from train.trainer.sharding import shard_batch
from train.trainer.state import Setup, TrainState, build
from train.trainer.step import check_batch_shape, make_eval_step, make_train_step


class NonFiniteLossError(FloatingPointError):
  pass




def _write_json(path: str, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _abstract_batch(batch: dict):
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
          for k, v in batch.items()}


def _timed_compile(jitted, *args):
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


@dataclasses.dataclass
class _Pending:
  """A dispatched step whose metrics the host has not read yet."""
  step: int
  metrics: dict


class Trainer:
  """One run's moving parts; `run` drives it. Notebooks may use `setup`,
  `train_step` and `eval_step` directly."""

  def __init__(self, cfg: Config, train_iter, eval_batches):
    self.cfg, self.tc = cfg, cfg.train
    self.setup: Setup = build(cfg)
    check_batch_shape(self.setup, self.tc.batch_size)  # before anything is written
    rundir.check_writable(self.tc.run_dir)
    self.train_iter = train_iter
    self.eval_batches = evaluation.put_batches(eval_batches, self.setup)
    self.ckpt = Checkpointer(os.path.join(self.tc.run_dir, "checkpoints"),
                             keep=self.tc.keep_checkpoints,
                             async_save=self.tc.async_checkpoint)
    self.train_step = make_train_step(self.setup)
    self.eval_step = make_eval_step(self.setup)
    # Replaced by AOT-compiled executables once the first batch is seen.
    self._train_exec, self._eval_exec = self.train_step, self.eval_step
    self.compile_times = {"compile_time_s": None, "eval_compile_time_s": None}
    self.timer = StepTimer()
    self.last_loss = self.last_metrics = None
    self.tokens_per_step = self.tc.batch_size * cfg.data.seq_len

  # -- state -----------------------------------------------------------------

  def restore_or_init(self) -> tuple[TrainState, int, dict[int, str]]:
    """(state, step, {step: error} of newer checkpoints that were unreadable)."""
    restored, skipped = self.ckpt.restore_latest(self.setup.abstract_state)
    if restored is None:
      return self.setup.init_state(), 0, skipped
    step, state, data_state = restored
    self.train_iter.set_state(data_state)
    return state, step, skipped

  def next_batch(self) -> tuple[dict, dict]:
    """(device batch, iterator state after it: where a resume continues)."""
    batch = shard_batch(next(self.train_iter), self.setup.mesh)
    return batch, self.train_iter.get_state()

  # -- per-step bookkeeping --------------------------------------------------

  def record(self, pending: _Pending | None, log: RunLog):
    """Read a finished step's metrics, stop on non-finite, log."""
    if pending is None:
      return
    m = {k: float(v) for k, v in jax.device_get(pending.metrics).items()}
    self.timer.step_done()
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      log.write(pending.step, m)
      raise NonFiniteLossError(
          f"non-finite loss {m['loss']} (grad norm {m['grad_norm']}) at step "
          f"{pending.step}; stopped. The last good checkpoint (step "
          f"{self.ckpt.latest_step()}) in {self.tc.run_dir} is intact: lower "
          f"OptimizerConfig.lr or check the data, then rerun to resume from it.")
    self.last_loss, self.last_metrics = m["loss"], m
    if pending.step % self.tc.log_every == 0 or pending.step == self.tc.steps:
      m.update(self.speed())
      log.write(pending.step, m)
      tps = m["tokens_per_s"]
      log.progress(pending.step, f"loss {m['loss']:.4f}" +
                   (f", {tps:,.0f} tok/s" if tps else ""))

  def speed(self) -> dict:
    t = self.timer.step_time
    return {"step_time_s": t, "tokens_per_s": t and self.tokens_per_step / t}

  def run_eval(self, state: TrainState, step: int, log: RunLog) -> dict:
    self.timer.exclude_current()
    metrics = evaluation.evaluate_batches(self._eval_exec, state, self.eval_batches,
                                          self.cfg.data)
    log.write(step, metrics)
    return metrics

  # -- the loop --------------------------------------------------------------

  def fit(self, state: TrainState, start: int, log: RunLog,
          stop: int | None = None) -> TrainState:
    """Steps start+1 .. stop (default: the last), with evals and checkpoints
    on the run's schedule. Compiles on the first call."""
    total = self.tc.steps
    stop, pending = total if stop is None else min(stop, total), None
    if start >= stop:
      return state
    self.timer.exclude_current()  # the pause since the last call is no step
    batch, data_state = self.next_batch()
    if self.compile_times["compile_time_s"] is None:
      self.compile_times = self.compile(batch)
    for step in range(start + 1, stop + 1):
      state, metrics = self._train_exec(state, batch)
      step_data_state = data_state
      if step < stop:  # overlaps the step running on the device
        batch, data_state = self.next_batch()
      self.record(pending, log)
      pending = _Pending(step, metrics)
      if self.tc.eval_every and step % self.tc.eval_every == 0 and step < total:
        self.record(pending, log)
        pending = None
        self.run_eval(state, step, log)
      if step == total or (self.tc.checkpoint_every and
                           step % self.tc.checkpoint_every == 0):
        self.record(pending, log)  # never checkpoint past a bad loss
        pending = None
        self.timer.exclude_current()
        self.ckpt.save(step, state, step_data_state)
    self.record(pending, log)
    return state

  def compile(self, batch: dict) -> dict:
    """AOT-compile both steps, so compile time is measured on its own and
    a mismatched input fails loudly instead of recompiling."""
    abstract = self.setup.abstract_state
    self._train_exec, t_train = _timed_compile(self.train_step, abstract,
                                               _abstract_batch(batch))
    self._eval_exec, t_eval = _timed_compile(self.eval_step, abstract,
                                             _abstract_batch(self.eval_batches[0]))
    return {"compile_time_s": t_train, "eval_compile_time_s": t_eval}

  def summary(self, final: dict, log: RunLog) -> dict:
    speed = self.speed()
    devices = self.setup.mesh.devices.ravel().tolist()
    flops = 3.0 * self.setup.flops_per_token()
    return {
        "run_dir": self.tc.run_dir, "steps": self.tc.steps,
        "params": self.setup.num_params(),
        "devices": len(devices), "device_kind": devices[0].device_kind,
        **speed, **self.compile_times,
        "train_flops_per_token": flops,
        "mfu": mfu(flops, speed["tokens_per_s"], devices, self.cfg.model.dtype),
        "peak_memory_bytes": peak_memory_bytes(),
        "train_loss": self.last_loss if self.last_loss is not None else log.last_loss,
        **aux_summary(self.last_metrics), **final,
    }


def _final_extras(setup: Setup, state: TrainState, eval_step, batches) -> dict:
  """What the final eval adds to the validation metrics: eval_lengths
  ({multiple: metrics}) and eval_positions ({scheme: {multiple: metrics}},
  RoPE rescaled at test time) where asked, and expert_load (per MoE layer,
  routing statistics on the eval batches) for models with MoE layers."""
  tc, out = setup.cfg.train, {}
  if tc.eval_lengths:
    out["eval_lengths"] = evaluation.evaluate_lengths(
        setup, state, tc.eval_lengths, eval_step=eval_step)
  if tc.eval_positions:
    out["eval_positions"] = evaluation.evaluate_extensions(
        setup, state, tc.eval_positions, tc.eval_lengths)
  loads = evaluation.expert_load(setup, state, batches)
  if loads:
    out["expert_load"] = loads
  return out


def train(cfg: Config, train_iter, eval_batches, *, data_info: dict) -> dict:
  """`run` with the data given: `train_iter` yields host batches (this
  process's rows) and has get_state()/set_state(); `eval_batches` is a
  list of host batches (this process's rows); `data_info` is written to
  run_dir/data.json."""
  tc = cfg.train
  distributed.check_same_config(configs.dumps(cfg))  # before any process writes
  changes = rundir.check_resume(cfg, data_info)
  trainer = Trainer(cfg, train_iter, eval_batches)  # checks shapes, makes run_dir
  if jax.process_index() == 0:  # the run record, once the resume check passed
    print(trainer.setup.describe(), flush=True)
    configs.save(cfg, tc.run_dir)
    _write_json(os.path.join(tc.run_dir, rundir.DATA_RECORD), data_info)
  state, start, skipped = trainer.restore_or_init()
  log = RunLog(tc.run_dir, start_step=start, total_steps=tc.steps)
  if start:
    log.write(start, {"event": "resume", "changed": changes,
                      **({"unreadable_checkpoints": skipped} if skipped else {})})
  try:
    state = trainer.fit(state, start, log)
    final = trainer.run_eval(state, tc.steps, log)
    final.update(_final_extras(trainer.setup, state, trainer.eval_step,
                               trainer.eval_batches))
  finally:
    trainer.ckpt.wait()  # a failed run still leaves its last save complete
    trainer.ckpt.close()
    log.close()
  summary = trainer.summary(final, log)
  if jax.process_index() == 0:
    _write_json(os.path.join(tc.run_dir, "summary.json"), summary)
  return summary


def run(cfg: Config) -> dict:
  """Train `cfg` (resuming from run_dir if it holds checkpoints), eval
  periodically and at the end; returns the summary also written to
  run_dir/summary.json: params, tokens_per_s, step_time_s, compile_time_s,
  mfu, peak_memory_bytes, train_loss, val_loss, val_ppl, val_bpb or
  val_accuracy, eval_lengths and eval_positions (if asked), expert_load
  (MoE models; `_final_extras`), run_dir."""
  tc = cfg.train
  train_iter = data.make_train_iter(cfg.data, tc.batch_size, seed=tc.seed)
  eval_batches = data.make_eval_batches(cfg.data, tc.batch_size // tc.grad_accum,
                                        tc.eval_batches)
  return train(cfg, train_iter, eval_batches, data_info=data.describe(cfg.data))


def evaluate(cfg: Config) -> dict:
  """Validation metrics of the latest readable checkpoint in
  cfg.train.run_dir (plus what `_final_extras` adds).
  The model must be the run record's; the data may differ."""
  rundir.check_same_model(cfg)
  setup = build(cfg)
  directory = os.path.join(cfg.train.run_dir, "checkpoints")
  ckpt = Checkpointer(directory, keep=cfg.train.keep_checkpoints, read_only=True)
  restored, _ = ckpt.restore_latest(setup.abstract_state)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  step, state, _ = restored
  eval_step = make_eval_step(setup)
  batches = evaluation.put_batches(data.make_eval_batches(
      cfg.data, evaluation.eval_batch_size(setup), cfg.train.eval_batches), setup)
  return {"step": step, **evaluation.evaluate_batches(eval_step, state, batches, cfg.data),
          **_final_extras(setup, state, eval_step, batches)}
