"""Sweep figures (matplotlib, PNG):

  quality_vs_throughput.png  validation quality vs training tokens/s, one
                             point per run, the Pareto front marked; one
                             panel per task.
  loss_curves.png            training loss vs tokens seen and vs training
                             time, from each run's metrics.jsonl; a row per
                             task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import matplotlib
import matplotlib.ticker
# Figures are drawn without pyplot, so importing this module chooses no
# backend: a notebook that runs a sweep keeps its own inline figures.
from matplotlib.figure import Figure

from train import results

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
  fig = Figure(figsize=(6 * max(len(tasks), 1), 4.5))
  axes = fig.subplots(1, max(len(tasks), 1), squeeze=False)
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
    # tokens/s at a short length measure per-call overhead more than the
    # architecture: the title says which lengths the panel was trained at
    lengths = ", ".join(str(n) for n in sorted({r["seq_len"] for r in rs}))
    ax.set(xscale="log", xlabel="training tokens/s",
           ylabel=f"{metric} ({'higher' if higher else 'lower'} is better)",
           title=f"{task}, sequence length {lengths}")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, METRICS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_curve(records: Sequence[dict], tokens_per_step: int) -> tuple[list, list, list]:
  """(tokens, training seconds, train loss) of the logged training steps.

  The trainer's records carry the step and its running mean steady-state
  step time, so training time at step s is s * step_time_s: compile, eval
  and checkpoint time excluded, which is what a throughput comparison wants.
  """
  train = [r for r in records if "loss" in r and r.get("step_time_s") is not None]
  return ([r["step"] * tokens_per_step for r in train],
          [r["step"] * r["step_time_s"] for r in train], [r["loss"] for r in train])


def loss_curves(rows: Sequence[dict], path: str) -> str:
  tasks = _by_task([r for r in rows if r["status"] == "done"])
  fig = Figure(figsize=(12, 4 * max(len(tasks), 1)))
  axes = fig.subplots(max(len(tasks), 1), 2, squeeze=False)
  for (ax_tok, ax_time), (task, rs) in zip(axes, sorted(tasks.items())):
    for i, r in enumerate(rs):
      tokens, secs, loss = train_curve(read_metrics(r["run_dir"]), r["tokens_per_step"])
      # 20 distinct colours, then dashed: ~25 mixers stay tellable apart
      style = dict(lw=1, color=matplotlib.colormaps["tab20"](i % 20), ls="-" if i < 20 else "--",
                   label=r["mixer"])
      ax_tok.plot(tokens, loss, **style)
      ax_time.plot(secs, loss, **style)
    ax_tok.set(xlabel="tokens", ylabel="train loss", title=f"{task}: loss vs tokens")
    ax_time.set(xlabel="training time (s): steps x measured step time",
                ylabel="train loss", title=f"{task}: loss vs training time")
    if ax_tok.lines:
      ax_time.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def sweep_plots(rows: Sequence[dict], out: str) -> list[str]:
  return [quality_vs_throughput(rows, os.path.join(out, "quality_vs_throughput.png")),
          loss_curves(rows, os.path.join(out, "loss_curves.png"))]


def bench_plot(report: dict, path: str, title: str) -> str:
  """Log-log: forward+backward time and temp memory per sequence vs length,
  decode time per token vs context; one line per mixer, under `title`."""
  fig = Figure(figsize=(19, 5.5))
  ax_t, ax_m, ax_d = fig.subplots(1, 3)
  colors = matplotlib.colormaps["tab20"].colors
  for i, m in enumerate(report["mixers"]):
    # 20 colours x 3 line styles: each of up to 60 mixers has its own line
    style = dict(color=colors[i % 20], ls=("-", "--", ":")[i // 20 % 3],
                 marker="o", ms=3, label=m["mixer"])
    tr = m["train"]
    if tr:
      Ls = [t["length"] for t in tr]
      ax_t.plot(Ls, [t["fwd_bwd_s"] / t["batch"] * 1e3 for t in tr], **style)
      ax_m.plot(Ls, [max(t["temp_bytes"], 1) / t["batch"] / 2**20 for t in tr],
                **style)
    if m["decode"]:
      ax_d.plot([d["context"] for d in m["decode"]],
                [d["s_per_token"] * 1e3 for d in m["decode"]], **style)
  env = report["environment"]
  for ax, ylabel, title in (
      (ax_t, "ms per sequence", "forward+backward time"),
      (ax_m, "MiB per sequence", "temporary memory (compiled fwd+bwd)"),
      (ax_d, "ms per token", "decode step vs context")):
    ax.set(xscale="log", yscale="log", ylabel=ylabel, title=title,
           xlabel="context length" if ax is ax_d else "sequence length L")
    ticks = env["contexts"] if ax is ax_d else env["lengths"]
    ax.set_xticks(ticks, [str(t) for t in ticks])  # the measured sizes, not 10^k
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  handles, labels = ax_t.get_legend_handles_labels()
  fig.legend(handles, labels, loc="center right", fontsize=7, ncol=1)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout(rect=(0, 0, 0.9, 1))
  fig.savefig(path, dpi=120)
  return path
