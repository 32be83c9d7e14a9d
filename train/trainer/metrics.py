"""Run metrics: steady-state timing, MFU, device memory, mixture-of-experts
statistics, and the run log (metrics.jsonl, TensorBoard events, a progress
bar or plain lines)."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per chip for matmuls, by device_kind substring (first
# match wins, so more specific names come first). "float32" is the rate of
# an fp32 matmul at JAX's default precision: TF32 tensor cores on NVIDIA
# Ampere/Hopper, one bf16 pass on TPU. Unknown kinds (and CPUs) get None.
PEAK_FLOPS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989.4e12, "float32": 494.7e12}),
    ("H200", {"bfloat16": 989.4e12, "float32": 494.7e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5", {"bfloat16": 459e12, "float32": 459e12}),
    ("TPU v6 lite", {"bfloat16": 918e12, "float32": 918e12}),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one device of this kind computing in `dtype`, or None."""
  for name, peaks in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peaks.get(str(dtype))
  return None


def mfu(train_flops_per_token: float, tokens_per_s: float | None,
        devices, dtype: str) -> float | None:
  """Model FLOPs utilization over `devices`; None where the peak is unknown."""
  peaks = [peak_flops(d.device_kind, dtype) for d in devices]
  if tokens_per_s is None or any(p is None for p in peaks):
    return None
  return train_flops_per_token * tokens_per_s / sum(peaks)


def peak_memory_bytes(devices=None) -> int | None:
  """Largest peak_bytes_in_use over the local devices, where reported."""
  peaks = []
  for d in devices or jax.local_devices():
    stats = d.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    peaks.append(stats["peak_bytes_in_use"])
  return max(peaks)


def aux_metrics(aux: dict, aux_loss) -> dict:
  """Flat scalar metrics of the layers' auxiliary outputs (`MoEAux` by layer
  index), none for a model without any: aux_loss (the weighted sum added to
  the loss); per layer i, moe/i/{load_min, load_max} (fraction of the
  assignments on the least and most loaded expert, 1/E when balanced),
  moe/i/{entropy, dropped, balance_loss, z_loss}; and over layers,
  moe/load_max (the largest) and moe/dropped (the mean), for the summary."""
  if not aux:
    return {}
  out = {"aux_loss": aux_loss}
  for i, a in aux.items():
    s = a.stats
    out.update({f"moe/{i}/load_min": jnp.min(s.load), f"moe/{i}/load_max": jnp.max(s.load),
                f"moe/{i}/entropy": s.entropy, f"moe/{i}/dropped": s.dropped,
                f"moe/{i}/balance_loss": s.balance_loss, f"moe/{i}/z_loss": s.z_loss})
  out["moe/load_max"] = jnp.max(jnp.stack([out[f"moe/{i}/load_max"] for i in aux]))
  out["moe/dropped"] = jnp.mean(jnp.stack([out[f"moe/{i}/dropped"] for i in aux]))
  return out


SUMMARY_AUX = ("aux_loss", "moe/load_max", "moe/dropped")


def aux_summary(metrics: dict | None) -> dict:
  """The run-level auxiliary figures of the last logged step (for summary.json
  and the sweep tables); empty for models without auxiliary outputs."""
  return {k: metrics[k] for k in SUMMARY_AUX if metrics and k in metrics}


class StepTimer:
  """Steady-state step time: the wall time between consecutive completed
  steps, skipping the first `skip` steps after (re)start (warm-up: caches,
  allocator, first transfers) and every interval that also ran an eval or
  started a checkpoint."""

  def __init__(self, skip: int = 2):
    self.skip, self.seen, self.last = skip, 0, None
    self.total, self.count = 0.0, 0
    self.dirty = False

  def exclude_current(self):
    """Mark the interval now running (eval, save) as not steady state."""
    self.dirty = True

  def step_done(self):
    now = time.perf_counter()
    self.seen += 1
    if self.last is not None and self.seen > self.skip and not self.dirty:
      self.total += now - self.last
      self.count += 1
    self.last, self.dirty = now, False

  @property
  def step_time(self) -> float | None:
    return self.total / self.count if self.count else None


def _jsonable(v):
  """Non-finite floats as strings ("nan", "inf"): JSON has no such numbers."""
  return str(v) if isinstance(v, float) and not math.isfinite(v) else v


class RunLog:
  """run_dir/metrics.jsonl (one JSON record per line), TensorBoard events
  in run_dir/tb, and a tqdm bar on a terminal or plain lines otherwise.

  Resuming from step s drops records after s (written by the killed run
  after its last checkpoint), so the log reads as one uninterrupted run.
  With several processes only the first writes; the others log nothing.
  """

  def __init__(self, run_dir: str, *, start_step: int, total_steps: int):
    from tensorboardX import SummaryWriter
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.last_loss = None  # of the kept records, for a run resumed at its end
    self.primary = jax.process_index() == 0
    self.bar = None
    if not self.primary:
      return
    self._truncate_after(start_step)
    self.file = open(self.path, "a")
    self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1)
    if sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)

  def _truncate_after(self, step: int):
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
          continue
        if record["step"] <= step:
          kept.append(line)
          self.last_loss = record.get("loss", self.last_loss)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, record: dict):
    if not self.primary:
      return
    record = {"step": step, **{k: _jsonable(v) for k, v in record.items()}}
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)

  def progress(self, step: int, text: str):
    if not self.primary:
      return
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix_str(text)
    else:
      print(f"step {step}: {text}", flush=True)

  def close(self):
    if not self.primary:
      return
    if self.bar is not None:
      self.bar.close()
    self.tb.close()
    self.file.close()
