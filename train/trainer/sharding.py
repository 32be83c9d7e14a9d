"""Device mesh and sharding rules.

The trainer always runs on a `Mesh` with axes ("data", "fsdp", "expert",
"sequence", "tensor"), one device or many. Parameters carry logical axis
names (layers/params.py); `RULES` map a logical name to a mesh axis, so
sharding a model is a table, not a model rewrite. The default shards every
"embed" dimension over "fsdp" (ZeRO-3 style: XLA all-gathers a weight where
it is used), the "experts" dimension of mixture-of-experts weights over
"expert" (expert parallelism: each device holds E / expert of the experts,
and capacity dispatch sends tokens to them with all_to_all,
layers/channel/dispatch.py), and "heads", "kv_heads" and "mlp" over "tensor"
(Megatron-style tensor parallelism: the input projections split by head or
hidden unit, the output projections by the same rows, so each device runs
whole heads and XLA all-reduces the block's output), and replicates the rest.
A dimension the mesh axis does not divide, or a mesh axis already used by an
earlier dimension of the same array, stays replicated; for "tensor" that is
refused instead (`check_parallel`), so a tensor layout never silently
replicates.

Activations: the batch is split over ("data", "fsdp", "expert") and the
length over "sequence"; `layout` gives the model these and the tensor rules
as logical names (`layers.parallel`), and the model pins its residual stream
to them at every block boundary. Mixers declare what they run under
(`MixerInfo.tensor_parallel`, `sequence_parallel`); the rest refuse those axes.

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

from arches.lm import DecoderLM, LMConfig
from arches.validation import ConfigError
from layers import channel, mixers, parallel
from layers.channel.dispatch import EXPERT_AXIS
from layers.params import AXES as LOGICAL_AXES

if TYPE_CHECKING:  # config checks mesh rules with this module
  from train.config import MeshConfig

TENSOR, SEQUENCE = "tensor", "sequence"
# Outermost first: tensor innermost, where devices are closest.
AXES = ("data", "fsdp", EXPERT_AXIS, SEQUENCE, TENSOR)
BATCH_AXES = ("data", "fsdp", EXPERT_AXIS)  # the batch dimension is split over these
MODEL_AXES = AXES[1:]  # sized in the config; data=-1 takes the devices they leave
DEFAULT_RULES = {"embed": "fsdp", "experts": EXPERT_AXIS, "heads": TENSOR,
                 "kv_heads": TENSOR, "mlp": TENSOR}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes AXES over `devices` (default: all). data=-1 takes
  every device the other axes leave over."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {name: getattr(cfg, name) for name in MODEL_AXES}
  for name, size in sizes.items():
    if n % size:
      raise ConfigError(f"mesh.{name}={size} must be >= 1 and divide the {n} "
                        "available devices", f"mesh.{name}")
  model = int(np.prod(list(sizes.values())))
  data = n // model if cfg.data == -1 else cfg.data
  if data * model != n:
    product = " x ".join(f"mesh.{k}={v}" for k, v in sizes.items())
    raise ConfigError(f"mesh.data={cfg.data} x {product} makes {data * model} "
                      f"devices; the mesh must cover the {n} available (data=-1 "
                      "takes all that the other axes leave)",
                      "mesh.data", *(f"mesh.{k}" for k in sizes))
  grid = np.asarray(devices, dtype=object).reshape(data, *sizes.values())
  return Mesh(grid, AXES)


def layout(mesh: Mesh, rules: dict[str, str]) -> parallel.Layout:
  """The activation layout the model is traced under: batch over
  BATCH_AXES, length over "sequence", and every logical axis the rules put
  on "tensor" there too (heads of q/k/v, hidden units)."""
  tensor = {name: axis for name, axis in rules.items() if axis == TENSOR}
  return parallel.Layout(mesh, {parallel.BATCH: BATCH_AXES,
                                parallel.LENGTH: SEQUENCE, **tensor})


def check_parallel(model: LMConfig, mesh: MeshConfig, seq_len: int) -> None:
  """Tensor and sequence axes > 1 need mixers that declare them
  (`MixerInfo`); a sequence axis must divide the training length, and a
  tensor axis every parameter dimension the rules put on it (heads,
  kv_heads, hidden units) so that no such weight silently stays whole."""
  for axis, size, flag in ((TENSOR, mesh.tensor, "tensor_parallel"),
                           (SEQUENCE, mesh.sequence, "sequence_parallel")):
    if size == 1:
      continue
    for i, (name, _) in enumerate(model.mixer_specs()):
      if not getattr(mixers.REGISTRY.get(name).info, flag):
        able = sorted(m for m in mixers.names()
                      if getattr(mixers.REGISTRY.get(m).info, flag))
        raise ConfigError(f"mesh.{axis}={size}: mixer {name!r} (layer {i}) cannot "
                          f"be split over a {axis} axis (its info.{flag} is False); "
                          f"use mesh.{axis}=1 or a mixer that can: {', '.join(able)}",
                          f"mesh.{axis}", "model.mixer")
  if seq_len % mesh.sequence:
    raise ConfigError(f"mesh.sequence={mesh.sequence} does not divide "
                      f"data.seq_len={seq_len}; each device holds seq_len / "
                      "sequence tokens of every row", "mesh.sequence", "data.seq_len")
  if mesh.tensor == 1:
    return
  params = nnx.state(nnx.eval_shape(lambda: DecoderLM(model, rngs=nnx.Rngs(0))),
                     nnx.Param)
  for path, var in jax.tree.leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    for name, size in zip(var.get_metadata().get("logical_axes") or (), var.shape):
      if mesh.rules.get(name) == TENSOR and size % mesh.tensor:
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ConfigError(f"mesh.tensor={mesh.tensor} does not divide the {name!r} "
                          f"dimension ({size}) of parameter {where}; the tensor "
                          f"axis must divide every dimension mesh.rules put on it",
                          "mesh.tensor", "model.mixer")


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
    if (axis is None or axis in used or mesh_shape[axis] == 1
        or size % mesh_shape[axis]):
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
  """Leading (batch) dimension over BATCH_AXES, the rest replicated (the
  model splits the length over "sequence" at its first block, so a
  process always loads whole rows)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host batch (this process's rows) -> global arrays split over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
