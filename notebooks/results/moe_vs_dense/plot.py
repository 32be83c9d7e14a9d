"""Validation bits per byte against training step for the dense-vs-MoE
comparison, one line per run, labelled by the run's name. (The sweep's own
figures label runs by sequence mixer, which is attention in every run here,
so they cannot tell dense from MoE apart.)

  python notebooks/results/moe_vs_dense/plot.py runs/sweeps/moe_vs_dense \
      notebooks/results/moe_vs_dense/val_bpb.png

Reads <sweep>/runs/<name>/metrics.jsonl; runs named "lr=<lr>__<variant>"
go to one panel per learning rate.
"""

from __future__ import annotations

import os
import sys

from matplotlib.figure import Figure

from train.plots import read_metrics


def main(sweep_dir: str, out: str) -> None:
  names = sorted(os.listdir(os.path.join(sweep_dir, "runs")))
  lrs = sorted({n.split("__")[0] for n in names})
  fig = Figure(figsize=(6 * len(lrs), 4.5))
  axes = fig.subplots(1, len(lrs), squeeze=False)
  for ax, lr in zip(axes[0], lrs):
    for name in (n for n in names if n.split("__")[0] == lr):
      val = [r for r in read_metrics(os.path.join(sweep_dir, "runs", name)) if "val_bpb" in r]
      variant = name.split("__", 1)[1]
      ax.plot([r["step"] for r in val], [r["val_bpb"] for r in val], marker="o", ms=3,
              ls="--" if "seed" in variant else "-", label=variant)
    ax.set(xlabel="training step (batch 16 x 64 bytes)", ylabel="validation bits per byte",
           title=lr)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


if __name__ == "__main__":
  main(*sys.argv[1:])
