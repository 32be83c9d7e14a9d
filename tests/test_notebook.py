"""The research notebook runs end to end at tiny size."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_research_notebook_executes_tiny(tmp_path, monkeypatch):
  pytest.importorskip("train.loop")  # the notebook trains with the trainer
  # The kernel inherits the environment: tiny sizes, outputs in tmp, this checkout.
  monkeypatch.setenv("MIXERLAB_TINY", "1")
  monkeypatch.setenv("MIXERLAB_OUT", str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  nb = nbformat.read(os.path.join(REPO, "notebooks", "research.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  assert os.path.exists(tmp_path / "results.csv")
  assert os.path.exists(tmp_path / "quality_vs_throughput.png")
