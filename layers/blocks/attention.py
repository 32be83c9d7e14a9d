"""The softmax-attention family's shared plumbing: its options, head
resolution, position schemes, q/k/v projections and the KV cache."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers import positions
from layers.params import Dense


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """Options of every softmax-attention mixer (dense and block-sparse), one
  definition so that they cannot drift apart. The registry offers them as
  flat options of each such mixer (`num_heads: 8` in a config).

  num_heads: query heads; num_kv_heads: key/value heads (default
  num_heads; MQA at 1, GQA between); head_dim (default d_model //
  num_heads); position: a scheme name or {"name": ..., **opts} (see
  `layers.positions`); kernel: "auto" or a name of the mixer's op
  (`Mixer.kernel_ops`); use_bias on q/k/v; out_bias on the output
  projection (Griffin / RecurrentGemma has only the latter).
  """
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  position: str | dict = "rope"
  kernel: str = "auto"
  use_bias: bool = False
  out_bias: bool = False

  def __post_init__(self):
    for name in ("num_heads", "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"attention option {name} must be >= 1, got {value}")
    if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")

  def heads(self, d_model: int) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) with the defaults resolved."""
    kv, head_dim = resolve_heads(d_model, self.num_heads, self.num_kv_heads,
                                 self.head_dim)
    return self.num_heads, kv, head_dim


def resolve_heads(d_model: int, num_heads: int, num_kv_heads: int | None,
                  head_dim: int | None) -> tuple[int, int]:
  """(num_kv_heads, head_dim): num_heads and d_model // num_heads when None."""
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by "
                       f"num_heads={num_heads}; set head_dim explicitly")
    head_dim = d_model // num_heads
  return num_kv_heads, head_dim


def build_position(spec: str | Mapping, head_dim: int, num_heads: int):
  """A position scheme from "name" or {"name": ..., **options}."""
  if isinstance(spec, str):
    return positions.build(spec, head_dim, num_heads=num_heads)
  spec = dict(spec)
  if "name" not in spec:
    raise ValueError(f"position spec {spec} needs a 'name'; one of "
                     f"{positions.names()}")
  return positions.build(spec.pop("name"), head_dim, num_heads=num_heads, **spec)


class QKVProjection(nnx.Module):
  """q [B,L,H,K], k/v [B,L,G,K] and the output projection, shared by the
  softmax-attention family. use_bias adds biases to q/k/v, out_bias to the
  output projection."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, rngs: nnx.Rngs, use_bias: bool = False,
               out_bias: bool = False):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of "
                       f"num_kv_heads={num_kv_heads}")
    self.q = Dense(d_model, (num_heads, head_dim), in_axes=("embed",),
                   out_axes=("heads", "head_dim"), rngs=rngs, use_bias=use_bias)
    self.k = Dense(d_model, (num_kv_heads, head_dim), in_axes=("embed",),
                   out_axes=("kv_heads", "head_dim"), rngs=rngs, use_bias=use_bias)
    self.v = Dense(d_model, (num_kv_heads, head_dim), in_axes=("embed",),
                   out_axes=("kv_heads", "head_dim"), rngs=rngs, use_bias=use_bias)
    self.o = Dense((num_heads, head_dim), d_model, in_axes=("heads", "head_dim"),
                   out_axes=("embed",), rngs=rngs, use_bias=out_bias)

  def flops_per_token(self) -> float:
    return 2.0 * sum(m.kernel.size for m in (self.q, self.k, self.v, self.o))


@struct.dataclass
class KVCache:
  """Keys (already position-encoded) and values for `max_len` slots.

  k, v: [B, max_len, kv_heads, head_dim]; pos: int32 scalar, slots filled.
  """
  k: jax.Array
  v: jax.Array
  pos: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[1]

  @classmethod
  def zeros(cls, batch_size: int, max_len: int, num_kv_heads: int,
            head_dim: int, dtype) -> "KVCache":
    shape = (batch_size, max_len, num_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((), jnp.int32))

  def append(self, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array) -> "KVCache":
    """The cache with a piece's keys and values written at `pos` (the
    caller checks room first: `layers.mixers.base.check_room`)."""
    at = (0, self.pos, 0, 0)
    return KVCache(
        jax.lax.dynamic_update_slice(self.k, k_BxLxGxK.astype(self.k.dtype), at),
        jax.lax.dynamic_update_slice(self.v, v_BxLxGxK.astype(self.v.dtype), at),
        self.pos + k_BxLxGxK.shape[1])
