"""Device mesh and sharding rules.

The trainer always runs on a `Mesh` with axes ("data", "fsdp", "expert"),
one device or many. Parameters carry logical axis names (layers/params.py);
`RULES` map a logical name to a mesh axis, so sharding a model is a table,
not a model rewrite. The default shards every "embed" dimension over "fsdp"
(ZeRO-3 style: XLA all-gathers a weight where it is used), the "experts"
dimension of mixture-of-experts weights over "expert" (expert parallelism:
each device holds E / expert of the experts, and capacity dispatch sends
tokens to them with all_to_all, layers/channel/dispatch.py), and replicates
the rest. A dimension the mesh axis does not divide, or a mesh axis already
used by an earlier dimension of the same array, stays replicated. Batches
are split over every axis.

Optimizer moments are `nnx.Param`s with the same metadata as the parameters
they track (optax maps over the Variables), so one rule covers the whole
train state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from arches.lm import LMConfig
from arches.validation import ConfigError
from layers import channel
from layers.channel.dispatch import EXPERT_AXIS
from layers.params import AXES as LOGICAL_AXES

if TYPE_CHECKING:  # config checks mesh rules with this module
  from train.config import MeshConfig

AXES = ("data", "fsdp", EXPERT_AXIS)
BATCH_AXES = AXES  # the batch dimension is split over every mesh axis


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "expert") mesh over `devices` (default: all).
  data=-1 takes every device the fsdp and expert axes leave over."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for name in ("fsdp", "expert"):
    size = getattr(cfg, name)
    if n % size:
      raise ConfigError(f"mesh.{name}={size} must be >= 1 and divide the {n} "
                        "available devices", f"mesh.{name}")
  model = cfg.fsdp * cfg.expert
  data = n // model if cfg.data == -1 else cfg.data
  if data * model > n:
    raise ConfigError(f"mesh.data={cfg.data} x mesh.fsdp={cfg.fsdp} x mesh.expert="
                      f"{cfg.expert} needs {data * model} devices; {n} are available "
                      "(data=-1 uses all that fsdp and expert leave)",
                      "mesh.data", "mesh.fsdp", "mesh.expert")
  grid = np.asarray(devices[:data * model], dtype=object).reshape(
      data, cfg.fsdp, cfg.expert)
  return Mesh(grid, AXES)


def check_expert_parallel(model: LMConfig, expert: int) -> None:
  """An expert axis of size `expert` > 1 must divide every MoE layer's
  number of experts, and those layers must use capacity dispatch (the path
  that runs on an expert axis; dropless would need
  jax.lax.ragged_all_to_all, which does not run on CPU)."""
  if expert == 1:
    return
  for i, spec in enumerate(model.channel_specs()):
    if spec is None or spec[0] != "moe":
      continue
    opts = {k: o.default for k, o in channel.REGISTRY.options("moe").items()}
    opts.update(spec[1])
    if opts["num_experts"] % expert:
      raise ConfigError(f"mesh.expert={expert} does not divide the num_experts="
                        f"{opts['num_experts']} of the moe layer {i}; the expert "
                        "axis must divide every MoE layer's number of experts",
                        "mesh.expert", "model.channel")
    if opts["dispatch"] != "capacity":
      raise ConfigError(f"mesh.expert={expert} needs dispatch='capacity' in the "
                        f"moe layer {i} (it has {opts['dispatch']!r}): expert "
                        "parallelism sends capacity buffers with all_to_all",
                        "mesh.expert", "model.channel")


def partition_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
                   mesh_shape: dict[str, int], rules: dict[str, str]) -> P:
  """PartitionSpec for one array from its logical axis names (see module doc)."""
  if logical_axes is None:
    return P()
  used, spec = set(), []
  for name, size in zip(logical_axes, shape, strict=True):
    axis = rules.get(name)
    if axis is None or axis in used or size % mesh_shape[axis]:
      spec.append(None)
    else:
      used.add(axis)
      spec.append(axis)
  return P(*spec)


def check_rules(rules: dict[str, str]) -> dict[str, str]:
  for name, axis in rules.items():
    if name not in LOGICAL_AXES:
      raise ConfigError(f"mesh.rules: sharding rule {name!r} -> {axis!r}: logical "
                        f"axes are {LOGICAL_AXES}", "mesh.rules")
    if axis not in AXES:
      raise ConfigError(f"mesh.rules: sharding rule {name!r} -> {axis!r}: mesh axes "
                        f"are {AXES}", "mesh.rules")
  return dict(rules)


def tree_shardings(abstract_tree, mesh: Mesh, rules: dict[str, str]):
  """NamedShardings for a pytree whose Variables carry `logical_axes`;
  everything else (step, rng, optimizer counts) is replicated."""
  rules = check_rules(rules)
  mesh_shape = dict(mesh.shape)

  def leaf(x):
    if isinstance(x, nnx.Variable):
      spec = partition_spec(x.get_metadata().get("logical_axes"), x.shape,
                            mesh_shape, rules)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(leaf, abstract_tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over every mesh axis, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host batch (this process's rows) -> global arrays split over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
