"""Multi-host start: one JAX process per host, joined by jax.distributed.

JAX's multi-controller runtime runs the same program on every host; each
process sees its own devices and the mesh spans all of them. `initialize`
joins the processes, before anything touches a device:

- explicit `--coordinator HOST:PORT --num-processes N --process-id I` (GPU
  clusters without SLURM, or a local test): all three or none;
- SLURM with more than one task (`srun`): jax reads SLURM's variables;
- a Cloud TPU VM (a TPU chip on the PCI bus): jax asks the TPU metadata
  (every worker of a pod slice runs the same command);
- anything else is a single process and nothing is called.

On CPU the processes exchange data with gloo collectives. Once joined,
`check_same_config` compares a hash of the resolved config across the
processes, so hosts started with different files or overrides stop with
one error before training instead of deadlocking or silently diverging.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import os

import jax
import numpy as np

from arches.validation import ConfigError

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips, as jax's own TPU VM detection reads them


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Explicit process-group flags; all None: detect from the environment."""
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    if not given:
      return
    missing = [f"--{k.replace('_', '-')}" for k in ("coordinator", "num_processes",
                                                    "process_id") if k not in given]
    if missing:
      raise ConfigError(f"multi-host flags {sorted(given)} given without "
                        f"{', '.join(missing)}: pass --coordinator, --num-processes "
                        "and --process-id together, or none of them")
    host, _, port = self.coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise ConfigError(f"--coordinator={self.coordinator!r} must be HOST:PORT "
                        "(process 0's address, e.g. 10.0.0.2:1234)")
    if self.num_processes < 1:
      raise ConfigError(f"--num-processes={self.num_processes} must be >= 1")
    if not 0 <= self.process_id < self.num_processes:
      raise ConfigError(f"--process-id={self.process_id} must be in [0, "
                        f"--num-processes={self.num_processes})")

  @property
  def explicit(self) -> bool:
    return self.coordinator is not None


def detect(cluster: Cluster, environ=os.environ) -> str | None:
  """How to join: "explicit", "slurm", "tpu", or None (one process)."""
  if cluster.explicit:
    return "explicit"
  if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
    return "slurm"
  if tpu_chips_present():
    return "tpu"
  return None


def tpu_chips_present(pci_root: str = "/sys/bus/pci/devices") -> bool:
  for vendor in glob.glob(os.path.join(pci_root, "*", "vendor")):
    with open(vendor) as f:
      if f.read().strip() == GOOGLE_PCI_VENDOR:
        return True
  return False


def initialize(cluster: Cluster = Cluster()) -> str | None:
  """Join the process group (see the module doc); returns how, or None for
  a single process. Call before any JAX computation."""
  how = detect(cluster)
  if how is None:
    return None
  # gloo is jax 0.10's default for CPU; set it so a CPU multi-process run
  # never depends on the default of another version.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if how == "explicit":
    jax.distributed.initialize(cluster.coordinator, cluster.num_processes,
                               cluster.process_id)
  else:  # jax reads SLURM's variables or the TPU metadata itself
    jax.distributed.initialize()
  return how


def _allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data` (any lengths), in process order."""
  from jax.experimental import multihost_utils
  lengths = multihost_utils.process_allgather(np.int32(len(data)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  rows = multihost_utils.process_allgather(padded)
  return [bytes(row[:n]) for row, n in zip(rows, lengths.tolist())]


def check_same_config(text: str) -> None:
  """ConfigError on every process unless all processes hold the same
  resolved config `text` (configs.dumps); names the first lines that differ
  from process 0's. A no-op for one process."""
  if jax.process_count() == 1:
    return
  digests = _allgather_bytes(hashlib.sha256(text.encode()).digest())
  odd = [i for i, d in enumerate(digests) if d != digests[0]]
  if not odd:
    return
  texts = _allgather_bytes(text.encode())  # every process takes this branch
  first = odd[0]
  diff = [l for l in difflib.unified_diff(
      texts[0].decode().splitlines(), texts[first].decode().splitlines(),
      "process 0", f"process {first}", n=0, lineterm="")
      if l[:1] in "+-" and l[:3] not in ("+++", "---")]
  raise ConfigError(
      f"the {len(digests)} processes disagree on the config: process(es) {odd} "
      f"differ from process 0 ({'; '.join(diff[:6])}); start every process with "
      "the same config files and overrides")
