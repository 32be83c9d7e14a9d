"""Parameters with logical axis names, and the two modules built on them.

Every parameter is an `nnx.Param` whose metadata `logical_axes` names each
dimension ("embed", "heads", "kv", "mlp", "vocab", ...). Nothing here knows
about devices: `train` maps logical names to mesh axes with its own rules,
so sharding a model never needs a model rewrite.

Master weights are fp32. Modules compute in the dtype of their input: the
weights are cast at use, so bf16 activations give bf16 matmuls while the
optimizer keeps updating fp32 values.

A parameter created with `weight_decay=False` carries that in its metadata
and the trainer's optimizer never decays it, whatever its shape. Mixers use
it where their reference implementations exclude parameters from weight
decay: the dynamics of state-space models (A / Lambda, P, B, log dt; Mamba's
A_log and D) and RWKV's time-decay and time-mix parameters. Decaying them
pulls a trained recurrence towards the same fixed decay for every channel,
which no published model does.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Init = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

# Axis names used across the library. Kept here so rules in `train` and
# checks in tests have one list to agree with.
AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "state",
        "conv", "experts", "norm", "layers")


def param(rngs: nnx.Rngs | None, init: Init | jax.Array, shape: Sequence[int],
          axes: Sequence[str | None], dtype=jnp.float32, *,
          weight_decay: bool = True) -> nnx.Param:
  """An fp32 `nnx.Param` named by `axes` (one name or None per dimension);
  `weight_decay=False` exempts it from weight decay (see module doc)."""
  axes = tuple(axes)
  if len(axes) != len(shape):
    raise ValueError(f"param of shape {tuple(shape)} needs {len(shape)} axis "
                     f"names, got {axes}")
  for a in axes:
    if a is not None and a not in AXES:
      raise ValueError(f"unknown logical axis {a!r}; known: {AXES}")
  value = init if isinstance(init, jax.Array) else init(
      rngs.params(), tuple(shape), dtype)
  extra = {} if weight_decay else {"weight_decay": False}
  return nnx.Param(jnp.asarray(value, dtype), logical_axes=axes, **extra)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _truncated_normal(key, std, shape, dtype):
  # One compiled program per shape instead of several eager ones: model
  # construction is otherwise dominated by tiny compiles on CPU.
  return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)


def fan_in_init(fan_in: int, scale: float = 1.0) -> Init:
  """Truncated normal with std scale/sqrt(fan_in) (LeCun)."""
  std = scale / math.sqrt(fan_in)
  return lambda key, shape, dtype: _truncated_normal(key, std, tuple(shape), dtype)


def constant_init(value: float) -> Init:
  return lambda key, shape, dtype: jnp.full(shape, value, dtype)


class Dense(nnx.Module):
  """y = einsum(x, W) from input axes to output axes, with an optional bias.

  `in_shape`/`out_shape` may be several dims (e.g. d_model -> heads x
  head_dim), which keeps head structure visible to sharding rules.
  """

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int],
               *, in_axes: Sequence[str | None], out_axes: Sequence[str | None],
               rngs: nnx.Rngs, use_bias: bool = False, init_scale: float = 1.0):
    in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    self.n_in = len(in_shape)
    fan_in = math.prod(in_shape)
    self.kernel = param(rngs, fan_in_init(fan_in, init_scale),
                        in_shape + out_shape, tuple(in_axes) + tuple(out_axes))
    self.bias = (param(rngs, constant_init(0.0), out_shape, out_axes)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel[...].astype(x.dtype)
    y = jnp.tensordot(x, w, axes=(tuple(range(x.ndim - self.n_in, x.ndim)),
                                  tuple(range(self.n_in))))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding; `attend` gives tied output logits."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs,
               init: Init | None = None):
    self.embedding = param(rngs, init or fan_in_init(1, 1.0),
                           (vocab_size, d_model), ("vocab", "embed"))

  def __call__(self, tokens: jax.Array, dtype=jnp.float32) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return x @ self.embedding[...].astype(x.dtype).T


def logical_axes(tree) -> object:
  """Tree of logical axis tuples for every `nnx.Param` in a module/state."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def count_params(module: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
