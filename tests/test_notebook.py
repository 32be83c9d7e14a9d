"""The research notebook runs end to end at tiny size."""

import os

from notebook_runner import execute


def test_research_notebook_executes_tiny(tmp_path, monkeypatch):
  execute("research.ipynb", tmp_path, monkeypatch)
  assert os.path.exists(tmp_path / "results.csv")
  assert os.path.exists(tmp_path / "quality_vs_throughput.png")
