"""The length-extrapolation and MoE-vs-dense notebooks run end to end at
smoke size, and what they show comes from the runs: RoPE rescaled at
factor 1 is the trained model, at 2x it is not; expert loads are fractions
of the assignments."""

import csv
import json

import pytest

from notebook_runner import execute as run_notebook


def execute(name, out, monkeypatch):
  """notebooks/<name> at smoke size on the embedded corpus (quick); its cells."""
  return run_notebook(name, out, monkeypatch, MIXERLAB_TEXT=str(out / "absent.txt"))


def images(cells):
  return sum("image/png" in o.get("data", {}) for c in cells if c.cell_type == "code"
             for o in c.outputs)


def test_length_extrapolation_notebook(tmp_path, monkeypatch):
  cells = execute("length_extrapolation.ipynb", tmp_path, monkeypatch)
  assert images(cells) == 1 and (tmp_path / "bpb_vs_length.png").exists()
  with open(tmp_path / "results_lengths.csv") as f:
    got = {(r["run"], r["evaluated"], int(r["x train length"])): float(r["value"])
           for r in csv.DictReader(f)}
  assert set(got) == {("rope", how, m) for how in ("as trained", "yarn") for m in (1, 2)}
  assert got["rope", "yarn", 1] == pytest.approx(got["rope", "as trained", 1], abs=1e-6)
  assert abs(got["rope", "yarn", 2] - got["rope", "as trained", 2]) > 1e-4
  with open(tmp_path / "runs" / "rope" / "summary.json") as f:
    assert "expert_load" not in json.load(f)  # only MoE models report loads


def test_moe_vs_dense_notebook(tmp_path, monkeypatch):
  cells = execute("moe_vs_dense.ipynb", tmp_path, monkeypatch)
  assert images(cells) == 3
  runs = tmp_path / "runs"
  with open(runs / "lr=0.003__switch" / "summary.json") as f:
    loads = json.load(f)["expert_load"]
  assert list(loads) == ["1"]  # Switch: every other layer is MoE
  assert len(loads["1"]["load"]) == 8 and sum(loads["1"]["load"]) == pytest.approx(1, abs=1e-5)
  assert 0 <= loads["1"]["dropped"] < 1 and loads["1"]["balance_loss"] > 0
