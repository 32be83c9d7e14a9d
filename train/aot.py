"""Ahead-of-time compilation of the train step for devices this machine
does not have: a TPU pod slice, from a CPU host.

    mixerlab compile --topology v5p:2x4x4 --config configs/tiny.yaml mesh.fsdp=8

libtpu describes a TPU topology without any TPU attached
(`jax.experimental.topologies.get_topology_desc`, as MaxText's
train_compile does); the mesh is built over those devices from the
config's `mesh:` section, the train state and a global batch are abstract
(ShapeDtypeStructs with their shardings, nothing is allocated), and the
jitted train step is lowered and compiled for that topology. XLA's memory
analysis of the compiled program then says what one chip holds: a layout
that does not fit fails here, in seconds, not after a pod is booked.
`--topology cpu:N` compiles for N local CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count) with the same code.
"""

from __future__ import annotations

import dataclasses
import time

import jax

from arches.validation import ConfigError
from train import data
from train.config import Config
from train.trainer import sharding
from train.trainer.state import build
from train.trainer.step import check_batch_shape, make_train_step

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes",
                 "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


def topology_devices(topology: str) -> list:
  """The devices of `topology`: "PLATFORM:SHAPE" as libtpu names TPU slices
  ("v5p:2x2x1", "v5e:4x4", "v4:2x2x2"), or "cpu:N" for local CPU devices."""
  platform, _, shape = topology.partition(":")
  if not shape:
    raise ConfigError(f"--topology={topology!r} must be PLATFORM:SHAPE, e.g. "
                      "v5p:2x2x1 (a TPU slice) or cpu:8")
  if platform == "cpu":
    devices = jax.devices("cpu")
    if not shape.isdigit() or not 1 <= int(shape) <= len(devices):
      raise ConfigError(f"--topology={topology!r}: cpu:N needs 1 <= N <= {len(devices)} "
                        "local CPU devices (set XLA_FLAGS=--xla_force_host_platform_"
                        "device_count=N before starting)")
    return devices[:int(shape)]
  try:
    import libtpu  # noqa: F401  (the compiler for TPU topologies)
  except ImportError:
    raise ConfigError(f"--topology={topology!r} needs libtpu to compile for TPUs "
                      "(pip install 'mixerlab[tpu]'; libtpu 0.0.42.* matches jax "
                      "0.10.2)") from None
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(topology, platform="tpu").devices)
  except Exception as e:  # libtpu names what it cannot build
    raise ConfigError(f"--topology={topology!r}: libtpu cannot describe it: "
                      f"{str(e).strip().splitlines()[0][:300]}") from None


def abstract_batch(cfg: Config, mesh) -> dict:
  """A global training batch as ShapeDtypeStructs split over the mesh."""
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  spec = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=spec)
          for k, dtype in data.batch_dtypes(cfg.data).items()}


@dataclasses.dataclass(frozen=True)
class Report:
  topology: str
  layout: str                # Setup.describe(): mesh, devices, parameter bytes
  param_bytes: tuple[int, int]  # Setup.param_bytes(): (per device, in all)
  compile_s: float
  memory: dict               # MEMORY_FIELDS -> bytes per device

  @property
  def per_device_bytes(self) -> int:
    """What one device holds while the step runs: inputs, outputs that do
    not reuse (alias) a donated input, temporaries and the program."""
    m = self.memory
    return (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
            - m["alias_size_in_bytes"] + m["temp_size_in_bytes"]
            + m["generated_code_size_in_bytes"])

  def text(self) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    rows = [f"{k.removesuffix('_size_in_bytes')}: {mib(v)}" for k, v in self.memory.items()]
    return (f"{self.topology}: {self.layout}\ncompiled in {self.compile_s:.1f} s; per "
            f"device: {mib(self.per_device_bytes)} ({', '.join(rows)})")


def compile_train_step(cfg: Config, topology: str) -> Report:
  """Lower and compile cfg's train step for `topology` (see the module doc)."""
  mesh = sharding.make_mesh(cfg.mesh, topology_devices(topology))
  setup = build(cfg, mesh)
  check_batch_shape(setup, cfg.train.batch_size)
  t0 = time.perf_counter()
  compiled = make_train_step(setup).lower(setup.abstract_state,
                                          abstract_batch(cfg, mesh)).compile()
  seconds = time.perf_counter() - t0
  stats = compiled.memory_analysis()
  memory = {k: int(getattr(stats, k)) for k in MEMORY_FIELDS}
  return Report(topology, setup.describe(), setup.param_bytes(), seconds, memory)
