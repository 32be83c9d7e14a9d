"""The results table of a sweep: one row per run, CSV and Markdown.

Values come only from the trainer's summary; a metric a run did not report
(a failed run, bpb on MQAR, MFU on a platform without a peak-FLOPs figure)
stays blank.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence

from train import configs
from train.config import Config

# (column header, summary key or row field, Markdown format)
COLUMNS = (
    ("run", "run", "{}"),
    ("task", "task", "{}"),
    ("mixer", "mixer", "{}"),
    ("d_model", "d_model", "{}"),
    ("lr", "lr", "{:.0e}"),
    ("seed", "seed", "{}"),
    ("params", "params", "{:,}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("step time (ms)", "step_time_ms", "{:.1f}"),
    ("val loss", "val_loss", "{:.3f}"),
    ("val ppl", "val_ppl", "{:.2f}"),
    ("val bpb", "val_bpb", "{:.3f}"),
    ("val acc", "val_accuracy", "{:.3f}"),
    ("MFU", "mfu", "{:.2%}"),
    ("aux loss", "aux_loss", "{:.4f}"),
    ("max load", "moe/load_max", "{:.3f}"),
    ("dropped", "moe/dropped", "{:.2%}"),
    ("peak mem (MiB)", "peak_memory_mib", "{:.1f}"),
    ("status", "status", "{}"),
)
CSV_COLUMNS = COLUMNS + (("error", "error", "{}"),)
SUMMARY_KEYS = ("params", "tokens_per_s", "val_loss", "val_ppl", "val_bpb",
                "val_accuracy", "mfu", "aux_loss", "moe/load_max", "moe/dropped")
# Kept in the row as the summary has them (train.loop: the final eval's extras).
NESTED_KEYS = ("eval_lengths", "eval_positions", "expert_load")


def mixer_label(cfg: Config) -> str:
  """"mamba", or "h3+attention+h3+attention" for a pattern."""
  pattern = cfg.model.mixer if isinstance(cfg.model.mixer, tuple) else (cfg.model.mixer,)
  return "+".join(s if isinstance(s, str) else s["name"] for s in pattern)


def group(cfg: Config, key: str) -> str:
  """The same for runs whose configs differ only in the dotted `key`
  (and run_dir): optimizer.lr for best-of-lr, train.seed for seed spread."""
  d = configs.to_dict(cfg)
  section, field = key.split(".")
  del d[section][field], d["train"]["run_dir"]
  return json.dumps(d, sort_keys=True)


def _known(x):
  """None for values that are not a measurement (absent, NaN)."""
  return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def row(name: str, labels: dict, cfg: Config, entry: dict) -> dict:
  """One table row from a run's config and sweep-state entry."""
  s = entry.get("summary", {})
  r = {"run": name, "task": cfg.data.task, "mixer": mixer_label(cfg),
       "d_model": cfg.model.d_model, "lr": cfg.optimizer.lr,
       "status": entry.get("status", ""), "error": entry.get("error", ""),
       "run_dir": cfg.train.run_dir, "labels": labels,
       "seq_len": cfg.data.seq_len,
       "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
       "group": group(cfg, "optimizer.lr"), "seed": cfg.train.seed,
       "seed_group": group(cfg, "train.seed")}
  r.update({k: _known(s.get(k)) for k in SUMMARY_KEYS})
  r.update({k: s[k] for k in NESTED_KEYS if k in s})
  step, mem = _known(s.get("step_time_s")), _known(s.get("peak_memory_bytes"))
  r["step_time_ms"] = None if step is None else 1e3 * step
  r["peak_memory_mib"] = None if mem is None else mem / 2**20
  return r


def quality(r: dict) -> tuple[str, float | None, bool]:
  """(metric, value, higher_is_better) by which a run is ranked: accuracy
  where the task reports it (MQAR), else bits per byte, else loss."""
  for key, higher in (("val_accuracy", True), ("val_bpb", False), ("val_loss", False)):
    if r.get(key) is not None:
      return key, r[key], higher
  return "val_loss", None, False


def best_of_lr(rows: Sequence[dict]) -> list[dict]:
  """The best finished run of each group of runs differing only in lr."""
  best: dict[str, dict] = {}
  for r in rows:
    _, v, higher = quality(r)
    if v is None:
      continue
    cur = best.get(r["group"])
    if cur is None or (v > quality(cur)[1] if higher else v < quality(cur)[1]):
      best[r["group"]] = r
  return [r for r in rows if best.get(r["group"]) is r]


def over_seeds(rows: Sequence[dict]) -> list[dict]:
  """One row per setting run with two or more seeds (runs differing only in
  train.seed, finished, with a quality metric): the run names, task, mixer,
  metric, seeds, the metric's mean and spread (max - min), and the mean
  tokens/s."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    if quality(r)[1] is not None:
      groups.setdefault(r["seed_group"], []).append(r)
  out = []
  for rs in groups.values():
    if len(rs) < 2:
      continue
    metric = quality(rs[0])[0]
    vals = [r[metric] for r in rs]
    speeds = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s") is not None]
    out.append({"runs": ", ".join(r["run"] for r in rs), "task": rs[0]["task"],
                "mixer": rs[0]["mixer"], "metric": metric,
                "seeds": ", ".join(str(r["seed"]) for r in rs),
                "mean": sum(vals) / len(vals), "spread": max(vals) - min(vals),
                "tokens_per_s": sum(speeds) / len(speeds) if speeds else None})
  return out


SEED_COLUMNS = (("task", "task", "{}"), ("mixer", "mixer", "{}"), ("metric", "metric", "{}"),
                ("seeds", "seeds", "{}"), ("mean", "mean", "{:.3f}"),
                ("spread (max-min)", "spread", "{:.3f}"),
                ("tokens/s", "tokens_per_s", "{:,.0f}"), ("runs", "runs", "{}"))


def _at_lengths(r: dict, evaluated: str, by_multiple: dict) -> list[dict]:
  out = []
  for m, metrics in sorted(by_multiple.items(), key=lambda kv: int(kv[0])):
    metric, value, _ = quality(metrics)
    out.append({"run": r["run"], "task": r["task"], "mixer": r["mixer"],
                "evaluated": evaluated, "multiple": int(m),
                "eval_len": int(m) * r["seq_len"], "metric": metric, "value": value})
  return out


def lengths(rows: Sequence[dict]) -> list[dict]:
  """One row per run, evaluation and length from the runs' final evals at
  several contexts (train.eval_lengths): "as trained", or with RoPE
  rescaled at test time by a scheme (train.eval_positions); the quality
  metric (`quality`) at multiple x the training length."""
  out = []
  for r in rows:
    out += _at_lengths(r, "as trained", r.get("eval_lengths") or {})
    for scheme, by_multiple in (r.get("eval_positions") or {}).items():
      out += _at_lengths(r, scheme, by_multiple)
  return out


LENGTH_COLUMNS = (("run", "run", "{}"), ("task", "task", "{}"), ("mixer", "mixer", "{}"),
                  ("evaluated", "evaluated", "{}"), ("x train length", "multiple", "{}"),
                  ("eval length", "eval_len", "{}"), ("metric", "metric", "{}"),
                  ("value", "value", "{:.3f}"))


def seed_caption(seeded: Sequence[dict]) -> str:
  """One line per task and metric: the largest spread over seeds, the
  yardstick for reading differences between the table's rows; "" when no
  setting was run with several seeds."""
  worst: dict[tuple[str, str], dict] = {}
  for r in seeded:
    k = (r["task"], r["metric"])
    if k not in worst or r["spread"] > worst[k]["spread"]:
      worst[k] = r
  lines = [f"Seed noise on {task}: {metric} differs by up to {r['spread']:.3f} between "
           f"seeds ({r['mixer']}, seeds {r['seeds']}; {sum(s['task'] == task for s in seeded)} "
           "setting(s) run with several seeds); a smaller difference between rows "
           "is not a ranking." for (task, metric), r in sorted(worst.items())]
  return "\n".join(lines)


def _cell(r: dict, key: str, fmt: str) -> str:
  v = r.get(key)
  return "" if v is None else fmt.format(v)


def markdown(rows: Sequence[dict], columns=COLUMNS, caption: str = "") -> str:
  head = [c[0] for c in columns]
  lines = [caption, ""] if caption else []
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(_cell(r, k, f) for _, k, f in columns) + " |"
            for r in rows]
  return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict], path: str, columns=CSV_COLUMNS) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow([c[0] for c in columns])
    for r in rows:
      w.writerow(["" if r.get(k) is None else r[k] for _, k, _ in columns])


def write(rows: Sequence[dict], out: str, best_lr: bool = False) -> dict:
  """Write results.{csv,md} (and results_best_lr.* when asked,
  results_over_seeds.* when a setting ran with several seeds,
  results_lengths.* when runs evaluated at several lengths) under `out`;
  return {"rows", "shown", "seeds", "caption", "files"}. `shown` are the
  rows the plots (train.plots, which reads this module) use: the best-lr
  rows when best_lr, else all; `caption` is `seed_caption`, written above
  each results table."""
  seeded = over_seeds(rows)
  caption = seed_caption(seeded)
  files = []
  tables = [("results", rows, COLUMNS)]
  if best_lr:
    tables.append(("results_best_lr", best_of_lr(rows), COLUMNS))
  if seeded:
    tables.append(("results_over_seeds", seeded, SEED_COLUMNS))
  at_lengths = lengths(rows)
  if at_lengths:
    tables.append(("results_lengths", at_lengths, LENGTH_COLUMNS))
  for stem, rs, columns in tables:
    write_csv(rs, os.path.join(out, stem + ".csv"),
              CSV_COLUMNS if columns is COLUMNS else columns)
    with open(os.path.join(out, stem + ".md"), "w") as f:
      f.write(markdown(rs, columns, caption))
    files += [os.path.join(out, stem + ".csv"), os.path.join(out, stem + ".md")]
  shown = best_of_lr(rows) if best_lr else rows
  return {"rows": list(rows), "shown": list(shown), "seeds": seeded,
          "caption": caption, "files": files}
