"""Normalization layers. Statistics are taken in fp32 whatever the input
dtype, because a bf16 mean of squares loses ~3 significant digits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.params import constant_init, param


class RMSNorm(nnx.Module):
  """RMSNorm (Zhang & Sennrich, 2019): y = x / rms(x) * scale."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6,
               axis_name: str = "norm"):
    self.eps = eps
    self.scale = param(rngs, constant_init(1.0), (dim,), (axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm (Ba et al., 2016) with scale and bias; fp32 statistics."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-5,
               axis_name: str = "norm"):
    self.eps = eps
    self.scale = param(rngs, constant_init(1.0), (dim,), (axis_name,))
    self.bias = param(rngs, constant_init(0.0), (dim,), (axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mu), -1, keepdims=True)
    y = (x32 - mu) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def build(name: str, dim: int, *, rngs: nnx.Rngs, eps: float) -> nnx.Module:
  if name not in NORMS:
    raise ValueError(f"unknown norm {name!r}; choose one of {sorted(NORMS)}")
  return NORMS[name](dim, rngs=rngs, eps=eps)
