"""The recall-vs-state and hybrid-ratio notebooks run end to end at smoke
size (MIXERLAB_TINY=1) and write their tables and figures."""

import csv
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["recall_vs_state", "hybrid_ratio"])
def test_study_notebook_executes_tiny(name, tmp_path, monkeypatch):
  pytest.importorskip("train.loop")  # the notebooks train with the trainer
  monkeypatch.setenv("MIXERLAB_TINY", "1")
  monkeypatch.setenv("MIXERLAB_OUT", str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  nb = nbformat.read(os.path.join(REPO, "notebooks", f"{name}.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  assert (tmp_path / f"{name}.png").exists()
  with open(tmp_path / f"{name}.csv") as f:
    rows = list(csv.DictReader(f))
  assert rows and all(r["status"] == "done" for r in rows)
  state_columns = [k for k in rows[0] if "bytes/seq" in k]  # measured decode state
  assert state_columns and all(int(r[k]) > 0 for r in rows for k in state_columns)
