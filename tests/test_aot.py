"""Ahead-of-time compilation of the train step for a topology this machine
does not have (train/aot.py): a small TPU slice through libtpu's
compile-only topology when libtpu is installed, and local CPU devices with
the same code always."""

import importlib.util
import os

import pytest

from arches.lm import LMConfig
from train import aot, configs
from train.config import Config, MeshConfig, TrainConfig

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def small(**mesh) -> Config:
  return Config(model=LMConfig(vocab_size=256, d_model=64, n_layers=1),
                train=TrainConfig(batch_size=8), mesh=MeshConfig(**mesh))


def check_report(report: aot.Report):
  m = report.memory
  assert set(m) == set(aot.MEMORY_FIELDS)
  assert m["argument_size_in_bytes"] >= report.param_bytes[0] > 0
  assert m["temp_size_in_bytes"] > 0  # (XLA:CPU reports no code size)
  assert report.per_device_bytes > m["temp_size_in_bytes"]
  assert "per device" in report.text()


def test_compiles_for_local_cpu_devices():
  report = aot.compile_train_step(small(), "cpu:1")
  assert "over 1 cpu devices in 1 process(es)" in report.layout
  assert report.param_bytes[0] == report.param_bytes[1]
  check_report(report)


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install "
                    "'mixerlab[tpu]'); it is the compiler for TPU topologies")
def test_compiles_for_a_tpu_slice_with_fsdp():
  report = aot.compile_train_step(small(data=2, fsdp=2), "v5p:2x2x1")
  assert report.layout.startswith("mesh data=2 x fsdp=2")
  assert "over 4 tpu devices" in report.layout
  per_device, total = report.param_bytes
  # every embed dimension split in two: a layout that silently replicated fails
  assert per_device < 0.6 * total
  check_report(report)


def test_bad_topologies_are_one_line_errors():
  with pytest.raises(configs.ConfigError, match="must be PLATFORM:SHAPE"):
    aot.topology_devices("v5p")
  with pytest.raises(configs.ConfigError, match=r"cpu:N needs 1 <= N <="):
    aot.topology_devices("cpu:4096")
  if HAS_LIBTPU:
    with pytest.raises(configs.ConfigError, match="libtpu cannot describe it"):
      aot.topology_devices("v5p:3x3x3x3")
  else:
    with pytest.raises(configs.ConfigError, match="needs libtpu"):
      aot.topology_devices("v5p:2x2x1")


def test_cli_compile_reports_a_bad_topology_in_one_line(capsys):
  from train import cli
  assert cli.main(["compile", "--config", TINY, "--topology", "v5p"]) == 2
  assert capsys.readouterr().err.startswith(
      "mixerlab compile: error: --topology='v5p' must be PLATFORM:SHAPE")
