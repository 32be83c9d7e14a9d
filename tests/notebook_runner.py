"""Execute a notebook of notebooks/ at smoke size (MIXERLAB_TINY=1), as the
notebook tests do: outputs under `out`, this checkout on the kernel's path."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def execute(name: str, out, monkeypatch, **env: str):
  """Run notebooks/<name> with MIXERLAB_OUT=out (and `env`); its cells."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("train.loop")  # the notebooks train with the trainer
  # The kernel inherits the environment: tiny sizes, outputs in out, this checkout.
  for key, value in {"MIXERLAB_TINY": "1", "MIXERLAB_OUT": str(out), **env}.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(out)}}).execute()
  return nb.cells
