"""Sweep figures (matplotlib, Agg backend, PNG):

  quality_vs_throughput.png  validation quality vs training tokens/s, one
                             point per run, the Pareto front marked; one
                             panel per task.
  loss_curves.png            training loss vs tokens seen and vs wall time,
                             from each run's metrics.jsonl; a row per task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from train import results  # noqa: E402

METRICS = "metrics.jsonl"


def pareto_front(xs: Sequence[float], ys: Sequence[float], higher_y: bool) -> list[int]:
  """Indices of the points no other point beats in both x (higher is
  better) and y, ordered by x."""
  sign = 1 if higher_y else -1
  order = sorted(range(len(xs)), key=lambda i: (-xs[i], -sign * ys[i]))
  front, best = [], -float("inf")
  for i in order:  # by decreasing throughput: keep each new best quality
    if sign * ys[i] > best:
      front.append(i)
      best = sign * ys[i]
  return sorted(front, key=lambda i: xs[i])


def _by_task(rows):
  tasks: dict[str, list] = {}
  for r in rows:
    tasks.setdefault(r["task"], []).append(r)
  return tasks


def quality_vs_throughput(rows: Sequence[dict], path: str) -> str:
  tasks = _by_task([r for r in rows if r.get("tokens_per_s") and
                    results.quality(r)[1] is not None])
  fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(6 * max(len(tasks), 1), 4.5),
                           squeeze=False)
  for ax, (task, rs) in zip(axes[0], sorted(tasks.items())):
    metric, _, higher = results.quality(rs[0])
    rs = [r for r in rs if results.quality(r)[0] == metric]
    xs = [r["tokens_per_s"] for r in rs]
    ys = [r[metric] for r in rs]
    ax.scatter(xs, ys, s=18)
    for r, x, y in zip(rs, xs, ys):
      ax.annotate(r["mixer"], (x, y), fontsize=7, xytext=(3, 2),
                  textcoords="offset points")
    front = pareto_front(xs, ys, higher)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "r-o", ms=6,
            mfc="none", label="Pareto front")
    ax.set(xscale="log", xlabel="training tokens/s",
           ylabel=f"{metric} ({'higher' if higher else 'lower'} is better)",
           title=task)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, METRICS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_curve(records: Sequence[dict]) -> tuple[list, list, list]:
  """(tokens, wall seconds, train loss) of the training records."""
  train = [r for r in records if "loss" in r]
  return ([r["tokens"] for r in train], [r["time_s"] for r in train],
          [r["loss"] for r in train])


def loss_curves(rows: Sequence[dict], path: str) -> str:
  tasks = _by_task(rows)
  fig, axes = plt.subplots(max(len(tasks), 1), 2, figsize=(12, 4 * max(len(tasks), 1)),
                           squeeze=False)
  for (ax_tok, ax_time), (task, rs) in zip(axes, sorted(tasks.items())):
    for r in rs:
      tokens, secs, loss = train_curve(read_metrics(r["run_dir"]))
      if loss:
        ax_tok.plot(tokens, loss, lw=1, label=r["mixer"])
        ax_time.plot(secs, loss, lw=1, label=r["mixer"])
    ax_tok.set(xlabel="tokens", ylabel="train loss", title=f"{task}: loss vs tokens")
    ax_time.set(xlabel="wall time (s)", ylabel="train loss",
                title=f"{task}: loss vs wall time")
    if ax_tok.lines:
      ax_time.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def sweep_plots(rows: Sequence[dict], out: str) -> list[str]:
  return [quality_vs_throughput(rows, os.path.join(out, "quality_vs_throughput.png")),
          loss_curves(rows, os.path.join(out, "loss_curves.png"))]
