"""The optax optimizer from an `OptimizerConfig`: global-norm clipping, then
AdamW or Lion with decoupled weight decay on matrices only, under a warmup +
decay learning-rate schedule. `OptimizerConfig` checks its values against
OPTIMIZERS and DECAYS when it is built."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax
from flax import nnx

if TYPE_CHECKING:  # config checks its values against this module's tables
  from train.config import OptimizerConfig


def _cosine(t):
  return 0.5 * (1.0 + jnp.cos(math.pi * t))


DECAYS = {"cosine": _cosine, "linear": lambda t: 1.0 - t,
          "constant": lambda t: jnp.ones_like(t)}


def learning_rate(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """lr * min(1, (step+1)/warmup) * (r + (1-r) decay(t)), t going 0 -> 1 over
  the steps after warmup, r = min_lr_ratio. The first step already moves
  (lr/warmup), rather than wasting a step at lr 0."""
  decay, warmup = DECAYS[cfg.schedule], cfg.warmup_steps
  decay_steps = max(total_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum((step + 1.0) / max(warmup, 1), 1.0)
    t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay(t))

  return schedule


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "idx", k)))


def decays(path, variable: nnx.Variable, decay_embeddings: bool) -> bool:
  """Weight decay applies to weight matrices, not to norm parameters, biases
  or other vectors, not to parameters created with `weight_decay=False`
  (`layers.params`: SSM dynamics, RWKV decays), and not to the input
  embedding table ("vocab", "embed") unless `decay_embeddings`."""
  names = [_key_name(k) for k in path]
  meta = variable.get_metadata()
  axes = tuple(meta.get("logical_axes") or ())
  if meta.get("weight_decay") is False:
    return False
  if variable.ndim < 2 or names[-1] == "bias":
    return False
  if "norm" in axes or any("norm" in n for n in names):
    return False
  return decay_embeddings or axes != ("vocab", "embed")


def decay_mask(params: nnx.State, decay_embeddings: bool):
  """The params tree with each Variable's value replaced by a bool."""
  return jax.tree_util.tree_map_with_path(
      lambda path, v: v.replace(decays(path, v, decay_embeddings)), params,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def _adamw(cfg, lr, mask):
  return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=mask)


def _lion(cfg, lr, mask):
  return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=mask)


OPTIMIZERS = {"adamw": _adamw, "lion": _lion}


def make_optimizer(cfg: OptimizerConfig, total_steps: int,
                   params: nnx.State) -> optax.GradientTransformation:
  """Clip (if clip_norm > 0), then AdamW/Lion. `params` may be abstract: only
  its paths and axis names are read, to build the weight-decay mask."""
  opt = OPTIMIZERS[cfg.name](cfg, learning_rate(cfg, total_steps),
                             decay_mask(params, cfg.decay_embeddings))
  if cfg.clip_norm == 0:
    return opt
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
