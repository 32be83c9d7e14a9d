"""The bf16 soak table (issue 11): every mixer's final validation loss with
fp32 and with bf16 compute (fp32 master weights either way), from a sweep
whose grid has a `model.dtype` axis (configs/sweeps/bf16_soak.yaml).

    python -m train.soak runs/sweeps/bf16_soak notebooks/results/bf16_soak

A soak too long for one sitting can be run in parts: `mixerlab sweep
--only` runs some mixers into a new sweep directory, and `--previous`
takes the rows this directory has not run from an earlier report of the
same sweep file (they are marked in the table).

A pair passes when both runs finished (the trainer stops a run at the first
non-finite loss or gradient norm, so finished means finite throughout) and
|bf16 - fp32| <= MARGIN. A run that is missing or failed is shown as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax

from train import sweep as sweeps

SWEEP = "configs/sweeps/bf16_soak.yaml"
# nats per byte, fixed before the soak ran: about 2.5% of a final loss near
# 2, room for bf16 rounding noise in the trajectory, not for drift.
MARGIN = 0.05
DTYPES = ("float32", "bfloat16")


def verdict(fp32: float | None, bf16: float | None, errors: list[str]) -> str:
  if errors:
    return "FAIL: " + "; ".join(errors)
  if fp32 is None or bf16 is None:
    return "not run"
  return "ok" if abs(bf16 - fp32) <= MARGIN else f"FAIL: over {MARGIN}"


def pairs(sw: sweeps.Sweep, state: dict) -> list[dict]:
  """One row per mixer: final val losses per dtype, difference, verdict."""
  rows: dict[str, dict] = {}
  for v in sw.variants:
    cfg = sw.config(v)
    mixer, dtype = v.labels["mixer"], cfg.model.dtype
    r = rows.setdefault(mixer, {"mixer": mixer, "errors": [], "wall_s": 0.0})
    entry = state.get(v.name, {})
    if entry.get("status") == sweeps.FAILED:
      r["errors"].append(f"{dtype}: {entry.get('error', '')[:120]}")
    r[dtype] = entry.get("summary", {}).get("val_loss") if entry.get("status") == sweeps.DONE else None
    r["wall_s"] += entry.get("wall_s", 0.0)
  for r in rows.values():
    f, b = r["float32"], r["bfloat16"]
    r["diff"] = None if f is None or b is None else b - f
    r["verdict"] = verdict(f, b, r["errors"])
  return list(rows.values())


def with_previous(rows: list[dict], previous: list[dict]) -> list[dict]:
  """`rows`, with each row not run here taken from `previous` (marked)."""
  earlier = {r["mixer"]: r for r in previous if r["verdict"] != "not run"}
  return [dict(earlier[r["mixer"]], previous=True)
          if r["verdict"] == "not run" and r["mixer"] in earlier else r
          for r in rows]


def _fmt(x, spec="{:.4f}"):
  return "" if x is None else spec.format(x)


def markdown(rows: list[dict], sw: sweeps.Sweep, out: str, report: str,
             previous: str | None = None) -> str:
  cfg = sw.config(sw.variants[0])
  m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optimizer
  done = sum(r["verdict"] != "not run" for r in rows)
  passed = sum(r["verdict"] == "ok" for r in rows)
  wall = sum(r["wall_s"] for r in rows)
  earlier = sum(bool(r.get("previous")) for r in rows)
  lines = [
      "# bf16 soak: final validation loss, fp32 vs bf16 compute", "",
      "```bash",
      f"mixerlab sweep --config {sw.path} --out {out}"
      + (" --only <the mixers not in the previous report>" if previous else ""),
      f"python -m train.soak {out} {report}"
      + (f" --previous {previous}" if previous else ""),
      "```", "",
      f"- Conditions: {d.task} task (embedded corpus), d_model {m.d_model}, "
      f"{m.n_layers} layers, seq {d.seq_len}, batch {t.batch_size}, {t.steps} "
      f"steps, {o.name} lr {o.lr} (warmup {o.warmup_steps}, {o.schedule}), "
      f"seed {t.seed}; each mixer at its default options; fp32 master "
      f"weights, compute dtype fp32 or bf16; final loss over "
      f"{t.eval_batches} validation batches.",
      f"- Machine: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
      f"jax {jax.__version__}; wall time of the runs {wall / 60:.0f} min "
      "(a shared 2-core machine).",
      f"- Margin: |bf16 - fp32| <= {MARGIN} nats/byte, and no non-finite "
      "loss (the trainer stops a run at the first one).",
      *([f"- {earlier} rows (marked *) come from the previous report of "
         "this sweep file (`--previous`), measured in an earlier sitting; "
         "the wall time counts both."] if earlier else []),
      f"- Outcome: {passed} of {len(rows)} mixers pass; {len(rows) - done} not run.", "",
      "| mixer | fp32 loss | bf16 loss | bf16 - fp32 | verdict |",
      "| --- | --- | --- | --- | --- |"]
  for r in rows:
    mark = "*" if r.get("previous") else ""
    lines.append(f"| {r['mixer']}{mark} | {_fmt(r['float32'])} | {_fmt(r['bfloat16'])} "
                 f"| {_fmt(r['diff'], '{:+.4f}')} | {r['verdict']} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.soak", description=__doc__.split("\n\n")[0])
  p.add_argument("sweep_dir", help="the sweep's --out directory")
  p.add_argument("report_dir", help="where to write bf16_soak.{md,json}")
  p.add_argument("--config", default=SWEEP, help=f"the sweep file (default {SWEEP})")
  p.add_argument("--previous", metavar="JSON",
                 help="an earlier bf16_soak.json of the same sweep file: "
                 "rows not run here are taken from it")
  args = p.parse_args(argv)
  sw = sweeps.load(args.config)
  with open(os.path.join(args.sweep_dir, sweeps.STATE)) as f:
    rows = pairs(sw, json.load(f))
  if args.previous:
    with open(args.previous) as f:
      rows = with_previous(rows, json.load(f)["rows"])
  os.makedirs(args.report_dir, exist_ok=True)
  text = markdown(rows, sw, args.sweep_dir, args.report_dir, args.previous)
  with open(os.path.join(args.report_dir, "bf16_soak.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.report_dir, "bf16_soak.json"), "w") as f:
    json.dump({"margin": MARGIN, "rows": rows}, f, indent=1)
  print(text)
  return 0 if all(r["verdict"] in ("ok", "not run") for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
