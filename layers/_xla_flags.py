"""XLA CPU settings that known jaxlib releases need, applied on import of
`layers` (so before any of mixerlab's computations).

jaxlib 0.10.x: XLA's CPU "YNN reduce" fusion (a dot, elementwise ops and a
reduction fused into one YNNPACK subgraph) segfaults at run time on some
batched gradient programs, e.g. d/dk of the sub-chunked per-channel-decay
scores in `layers.kernels.linear_attention` (GLA, RWKV-6) at chunk sizes
above 16. Removing that one fusion type (`-reduce`) leaves the rest of
XLA's CPU pipeline as it is. Guarded by
tests/test_linear_attention.py::test_per_channel_decay_grad_runs_in_fresh_process.

Only set where verified (unknown XLA flags abort the process), only when
the user has not chosen the setting, and only effective before the CPU
backend starts; otherwise a warning says how to set it by hand.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# jaxlib version prefix -> flags that release needs (each verified there).
NEEDED = {"0.10.": (f"{YNN_FLAG}=-reduce",)}


def needed_flags(jaxlib_version: str) -> tuple[str, ...]:
  return next((f for prefix, f in NEEDED.items()
               if jaxlib_version.startswith(prefix)), ())


def apply(environ=os.environ) -> tuple[str, ...]:
  """Append the needed flags to XLA_FLAGS; returns those added."""
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ()
  current = environ.get("XLA_FLAGS", "")
  add = tuple(f for f in needed_flags(version)
              if f.split("=")[0] not in current)  # the user's choice wins
  if not add:
    return ()
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    warnings.warn(f"jaxlib {version}: JAX started before mixerlab's layers "
                  f"were imported, so the CPU workaround {' '.join(add)} "
                  f"is not in effect; set XLA_FLAGS='{' '.join(add)}' in the "
                  f"environment (see layers/_xla_flags.py)", stacklevel=3)
    return ()
  environ["XLA_FLAGS"] = " ".join([current, *add]).strip()
  return add


apply()
