"""The recall-vs-state and hybrid-ratio notebooks run end to end at smoke
size (MIXERLAB_TINY=1) and write their tables and figures."""

import csv

import pytest

from notebook_runner import execute


@pytest.mark.parametrize("name", ["recall_vs_state", "hybrid_ratio"])
def test_study_notebook_executes_tiny(name, tmp_path, monkeypatch):
  execute(f"{name}.ipynb", tmp_path, monkeypatch)
  assert (tmp_path / f"{name}.png").exists()
  with open(tmp_path / f"{name}.csv") as f:
    rows = list(csv.DictReader(f))
  assert rows and all(r["status"] == "done" for r in rows)
  state_columns = [k for k in rows[0] if "bytes/seq" in k]  # measured decode state
  assert state_columns and all(int(r[k]) > 0 for r in rows for k in state_columns)
