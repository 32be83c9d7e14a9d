"""The run directory: is it usable, and may this config resume it.

A run directory holds one record of its config, config.yaml (written by
the trainer once `check_resume` has passed, so it always describes the
model its checkpoints hold), and data.json (what data it reads). Resuming
its checkpoints with a config that differs from the record outside
RESUMABLE, or with other data under the same config, is refused naming
each differing key with both values; the record is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile

from omegaconf import OmegaConf

from arches.validation import ConfigError
from train import configs
from train.config import Config

# The keys that may differ between a run's record and the config resuming
# it: how the run is observed, stored and laid out on devices (the update is
# the same with other grad_accum, remat or mesh), and the learning-rate
# schedule's end (steps, min_lr_ratio) from the resume step on. Any other
# key changes the model, the data stream or the optimizer's trajectory, and
# resuming would silently splice two runs into one curve.
RESUMABLE = frozenset({
    "train.steps", "train.eval_every", "train.eval_batches", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.eval_lengths",
    "train.eval_positions",
    "train.async_checkpoint", "train.run_dir", "train.grad_accum",
    "optimizer.min_lr_ratio", "model.remat", "data.prefetch",
    "mesh.data", "mesh.fsdp", "mesh.rules"})
DATA_RECORD = "data.json"


def check_writable(run_dir: str) -> None:
  """ConfigError naming the path unless run_dir can be created and written
  (not a file, not read-only, not full)."""
  if os.path.exists(run_dir) and not os.path.isdir(run_dir):
    raise ConfigError(f"train.run_dir={run_dir!r} is a file, not a directory",
                      "train.run_dir")
  try:
    os.makedirs(run_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=run_dir) as f:
      f.write(bytes(1 << 16))
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise ConfigError(f"train.run_dir={run_dir!r} cannot be written: "
                      f"{e.strerror or e} ({e.filename or run_dir})", "train.run_dir") from None


def _flat(sections: dict) -> dict:
  """{"section.field": value} of a nested config dict."""
  return {f"{s}.{k}": v for s, fields in sections.items() for k, v in fields.items()}


def _differences(saved: dict, now: dict) -> dict[str, dict]:
  return {k: {"saved": saved.get(k), "now": now.get(k)}
          for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)}


def _describe(diff: dict) -> str:
  return ", ".join(f"{k} (saved {d['saved']!r}, now {d['now']!r})" for k, d in diff.items())


def _as_record(cfg: Config) -> dict:
  """Flat, through the same YAML dump as the record, so values compare alike."""
  return _flat(OmegaConf.to_container(OmegaConf.create(configs.dumps(cfg))))


def record_differences(cfg: Config) -> dict[str, dict] | None:
  """{key: {"saved", "now"}} where cfg differs from run_dir's run record
  (config.yaml); None when there is no record."""
  path = os.path.join(cfg.train.run_dir, configs.FILENAME)
  if not os.path.exists(path):
    return None
  # A key the record lacks (it predates the key) counts as its default.
  saved = {**_as_record(Config()), **_flat(configs.read_yaml(path, "run record"))}
  return _differences(saved, _as_record(cfg))


def _has_checkpoints(run_dir: str) -> bool:
  checkpoints = os.path.join(run_dir, "checkpoints")
  return os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))


def check_resume(cfg: Config, data_info: dict) -> dict[str, dict]:
  """Before resuming run_dir's checkpoints: ConfigError naming the keys
  unless cfg differs from the run record only in RESUMABLE keys and the
  data record (data.json) is unchanged. Returns the allowed changes."""
  run_dir = cfg.train.run_dir
  if not _has_checkpoints(run_dir):
    return {}
  diff = record_differences(cfg)
  if diff is None:
    raise ConfigError(f"train.run_dir={run_dir!r} holds checkpoints but no run record "
                      f"({configs.FILENAME}) to check this config against; use a new "
                      "run_dir", "train.run_dir")
  refused = {k: d for k, d in diff.items() if k not in RESUMABLE}
  if refused:
    raise ConfigError(
        f"train.run_dir={run_dir!r} holds checkpoints of a different run: "
        f"{_describe(refused)} differ. Resume with the recorded values (see "
        f"{os.path.join(run_dir, configs.FILENAME)}) or use a new run_dir; on resume "
        f"only {', '.join(sorted(RESUMABLE))} may change", *refused)
  data_path = os.path.join(run_dir, DATA_RECORD)
  if os.path.exists(data_path):
    with open(data_path) as f:
      saved = _flat({"data.json": json.load(f)})
    now = _flat({"data.json": json.loads(json.dumps(data_info))})
    if saved != now:
      raise ConfigError(
          f"train.run_dir={run_dir!r} holds checkpoints trained on other data under "
          f"the same config: {_describe(_differences(saved, now))} differ (was the "
          "corpus edited?); restore the data or use a new run_dir", "data.path")
  return diff


def check_same_model(cfg: Config) -> None:
  """Before restoring run_dir's checkpoints for evaluation: ConfigError
  unless the model is the run record's (the data may differ)."""
  other = {k: d for k, d in (record_differences(cfg) or {}).items()
           if k.startswith("model.") and k not in RESUMABLE}
  if other:
    raise ConfigError(
        f"train.run_dir={cfg.train.run_dir!r} holds checkpoints of another model: "
        f"{_describe(other)} differ; evaluate with its run record "
        f"({os.path.join(cfg.train.run_dir, configs.FILENAME)})", *other)
