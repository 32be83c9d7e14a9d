"""The train state: one pytree that a jitted step maps to the next one.

The model's structure (an `nnx.GraphDef`) is captured once, when the
`Setup` is built; steps only see arrays and `nnx.merge` them back into a
module inside the trace, so nothing walks the object graph per step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from arches.lm import DecoderLM, LMConfig
from train.trainer import optim, sharding
from train.config import Config


@struct.dataclass
class TrainState:
  """params: fp32 master weights (nnx.Param state); buffers: the model's other
  variables, changed only outside the gradient (DeepSeek-V3-style MoE
  routing biases, moved towards balance after each step; empty for a dense
  model) and checkpointed with the rest, so a resume is exact; opt_state:
  optax state (moments are Params with the same axis names); step: updates
  done (int32); rng: a raw uint32[2] key reserved for stochastic layers
  (none of today's layers draws from it), checkpointed with the rest so a
  resumed run would draw the same numbers."""
  params: nnx.State
  buffers: nnx.State
  opt_state: Any
  step: jax.Array
  rng: jax.Array


def _split(model: nnx.Module):
  return nnx.split(model, nnx.Param, ...)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything fixed for a run: mesh, model structure, optimizer, and the
  shape and sharding of the state. `init_state()` builds the state already
  placed on the mesh (created inside jit, so no device holds a full copy of
  a sharded parameter)."""
  cfg: Config
  mesh: Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  abstract_state: TrainState    # ShapeDtypeStructs carrying their shardings
  state_sharding: TrainState

  @property
  def layout(self):
    """The activation layout the model is traced under (`layers.parallel`)."""
    return sharding.layout(self.mesh, self.cfg.mesh.rules)

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_state.params))

  def param_bytes(self) -> tuple[int, int]:
    """(bytes of the parameters on one device, bytes in all): what the
    mesh layout splits (optimizer moments follow the same split)."""
    leaves = jax.tree.leaves(self.abstract_state.params)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                     for x in leaves)
    return per_device, total

  def describe(self) -> str:
    """One line for the start of a run: the mesh and what one device holds."""
    per_device, total = self.param_bytes()
    axes = " x ".join(f"{name}={size}" for name, size in self.mesh.shape.items())
    devices = self.mesh.devices.ravel()
    mib = lambda b: f"{b / 2**20:.2f} MiB"
    processes = len({d.process_index for d in devices})
    return (f"mesh {axes} over {devices.size} {devices[0].platform} devices in "
            f"{processes} process(es); parameters {mib(per_device)} per "
            f"device of {mib(total)}")

  def model(self, state: TrainState) -> DecoderLM:
    """The module holding `state`'s weights (e.g. for arches.generate)."""
    return nnx.merge(self.graphdef, state.params, state.buffers)

  def flops_per_token(self) -> float:
    """Forward model FLOPs per token at the training length."""
    return self.model(self.abstract_state).flops_per_token(self.cfg.data.seq_len)

  def init_state(self) -> TrainState:
    init = jax.jit(_init_fn(self.cfg.model, self.tx, self.cfg.train.seed),
                   out_shardings=self.state_sharding)
    return init()


def _init_fn(model_cfg: LMConfig, tx, seed: int):
  def init():
    model_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    _, params, buffers = _split(DecoderLM(model_cfg, rngs=nnx.Rngs(model_key)))
    return TrainState(params, buffers, tx.init(params),
                      jnp.zeros((), jnp.int32), rng)
  return init


def build(cfg: Config, mesh: Mesh | None = None) -> Setup:
  """The `Setup` for `cfg` on `mesh` (default: made from cfg.mesh)."""
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  sharding.check_expert_parallel(cfg.model, mesh.shape.get(sharding.EXPERT_AXIS, 1))
  graphdef, abstract_params, _ = _split(
      nnx.eval_shape(lambda: DecoderLM(cfg.model, rngs=nnx.Rngs(0))))
  tx = optim.make_optimizer(cfg.optimizer, cfg.train.steps, abstract_params)
  shapes = jax.eval_shape(_init_fn(cfg.model, tx, cfg.train.seed))
  state_sharding = sharding.tree_shardings(shapes, mesh, cfg.mesh.rules)
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, state_sharding)
  return Setup(cfg, mesh, graphdef, tx, abstract, state_sharding)
