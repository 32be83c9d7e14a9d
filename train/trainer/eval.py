"""Validation: loss, perplexity, bits per byte (byte-level text) or accuracy
(synthetic tasks) over fixed eval batches, and the same at longer contexts
(length extrapolation), also with RoPE rescaled at test time; the routing
statistics of mixture-of-experts layers on the same batches."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from arches.extend import extend_rope
from train import data
from train.config import DataConfig
from train.trainer.sharding import batch_divisor, shard_batch
from train.trainer.state import Setup, TrainState, build
from train.trainer.step import forward_with_aux, make_eval_step


def byte_level(data_cfg: DataConfig) -> bool:
  """The text task is byte-level (train/data/__init__.py: one token per byte), so
  bits per byte is the loss in bits; synthetic tasks report accuracy."""
  return data_cfg.task == "text"


def put_batches(batches, setup: Setup) -> list[dict]:
  """Host batches (this process's rows) -> arrays split over the mesh, once:
  the eval set is reused at every eval."""
  return [shard_batch(b, setup.mesh) for b in batches]


def summarize(sums: dict, data_cfg: DataConfig) -> dict:
  """val_loss (nats/token), val_ppl, and val_bpb or val_accuracy."""
  count = max(sums["count"], 1.0)
  loss = sums["nll"] / count
  out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
  if byte_level(data_cfg):
    out["val_bpb"] = loss / math.log(2)
  else:
    out["val_accuracy"] = sums["correct"] / count
  return out


def evaluate_batches(eval_step, state: TrainState, batches, data_cfg: DataConfig) -> dict:
  """Token-weighted metrics over device batches (see `summarize`)."""
  per_batch = jax.device_get([eval_step(state, b) for b in batches])  # one sync
  sums = {k: float(np.sum([s[k] for s in per_batch])) for k in per_batch[0]}
  return summarize(sums, data_cfg)


def eval_batch_size(setup: Setup, multiple: int = 1) -> int:
  """The micro-batch size, cut by `multiple` so a long-context eval batch
  holds about as many tokens, kept divisible by the mesh."""
  micro = setup.cfg.train.batch_size // setup.cfg.train.grad_accum
  n = batch_divisor(setup.mesh)
  return max(n, micro // multiple // n * n)


def evaluate_lengths(setup: Setup, state: TrainState, multiples, *,
                     eval_step, make_batches=None, n_batches: int | None = None) -> dict:
  """Validation metrics at context multiples x seq_len, e.g. (1, 2, 4, 8):
  {multiple: summarize(...)}. `eval_step` is jitted, so each new length
  compiles once. make_batches(data_cfg, batch_size, n_batches) gives host
  batches (default: train.data.make_eval_batches)."""
  make_batches = make_batches or data.make_eval_batches
  n_batches = setup.cfg.train.eval_batches if n_batches is None else n_batches
  out = {}
  for m in multiples:
    if not isinstance(m, int) or m < 1:
      raise ValueError(f"eval_lengths holds context multiples >= 1, got {m!r}")
    data_cfg = dataclasses.replace(setup.cfg.data, seq_len=m * setup.cfg.data.seq_len)
    batches = put_batches(make_batches(data_cfg, eval_batch_size(setup, m), n_batches),
                          setup)
    out[m] = evaluate_batches(eval_step, state, batches, data_cfg)
  return out


def evaluate_extensions(setup: Setup, state: TrainState, schemes, multiples,
                        n_batches: int | None = None) -> dict:
  """{scheme: {multiple: summarize(...)}}: `evaluate_lengths` with every
  plain-RoPE layer switched at test time to `scheme` (arches.extend) at
  factor = the multiple, original length seq_len; the trained weights are
  used unchanged. One compile per scheme and multiple."""
  cfg, out = setup.cfg, {}
  for scheme in schemes:
    out[scheme] = {}
    for m in multiples:
      model = extend_rope(cfg.model, scheme, m, cfg.data.seq_len)
      extended = build(dataclasses.replace(  # a model without plain RoPE
          cfg, model=model, train=dataclasses.replace(cfg.train, eval_positions=())),
          setup.mesh)
      out[scheme][m] = evaluate_lengths(extended, state, [m], n_batches=n_batches,
                                        eval_step=make_eval_step(extended))[m]
  return out


def expert_load(setup: Setup, state: TrainState, batches) -> dict:
  """Routing statistics of each mixture-of-experts layer over the device
  `batches` (the eval set), batch means: {layer: {"load": fraction of the
  assignments per expert (1/E each when balanced), "balance_loss",
  "z_loss", "entropy", "dropped"}} (layers.channel.routers.RouterStats);
  {} for a model without MoE layers."""
  def stats(st, batch):
    _, aux = forward_with_aux(setup.graphdef, st.params, st.buffers, batch, setup.layout)
    return {i: a.stats for i, a in aux.items()}
  if not jax.eval_shape(stats, state, batches[0]):
    return {}
  fn = jax.jit(stats)
  per_batch = jax.device_get([fn(state, b) for b in batches])  # one sync
  mean = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *per_batch)
  return {i: {f.name: np.asarray(getattr(s, f.name)).tolist()
              for f in dataclasses.fields(s)} for i, s in mean.items()}
