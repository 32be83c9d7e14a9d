"""Mixers with a fixed-size decode state: the call plumbing and cache
(`RecurrentMixer`, `RecurrentCache`), per-head projections and the gated
per-head norm of RetNet, GLA and RWKV-6."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers import positions
from layers.mixers.base import Mixer, positions_for
from layers.params import Dense, constant_init, param


@struct.dataclass
class RecurrentCache:
  """A fixed-size recurrent state, whatever max_len.

  state: the mixer's state pytree (its running sums are fp32);
  pos: int32 scalar, tokens seen (for positions and fresh-start checks).
  """
  state: Any
  pos: jax.Array


class RecurrentMixer(Mixer):
  """Call plumbing for mixers whose decode state has a fixed size.

  Subclasses define `mix(x, pos, segment_ids, state) -> (y, state)` and
  `zero_state(batch_size, dtype)`. A full call mixes from the zero state
  with positions restarting at every segment; an incremental call mixes
  from the cached state at positions after `cache.pos`.
  """

  def mix(self, x, pos, segment_ids, state):
    raise NotImplementedError

  def zero_state(self, batch_size: int, dtype) -> Any:
    raise NotImplementedError

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    if cache is None:
      pos = (positions_for(x) if segment_ids is None
             else positions.segment_positions(segment_ids))
      y, _ = self.mix(x, pos, segment_ids, self.zero_state(x.shape[0], x.dtype))
      return y
    y, state = self.mix(x, positions_for(x, cache.pos), None, cache.state)
    return y, RecurrentCache(state, cache.pos + x.shape[1])

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    del max_len  # the state does not grow with length
    return RecurrentCache(self.zero_state(batch_size, dtype),
                          jnp.zeros((), jnp.int32))


def head_dense(d_model: int, num_heads: int, dim: int, rngs: nnx.Rngs,
               use_bias: bool = False) -> Dense:
  """d_model -> [num_heads, dim]."""
  return Dense(d_model, (num_heads, dim), in_axes=("embed",),
               out_axes=("heads", "head_dim"), rngs=rngs, use_bias=use_bias)


class GatedHeadNorm(nnx.Module):
  """swish(x W_g [+ b_g]) * GroupNorm_heads(o), the output gate of RetNet,
  GLA and RWKV-6: each head's output is normalized on its own (statistics
  in fp32), since heads with different decays have very different scales."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
               rngs: nnx.Rngs, use_bias: bool, eps: float = 1e-5):
    self.eps = eps
    self.gate = head_dense(d_model, num_heads, head_dim, rngs, use_bias=use_bias)
    self.scale = param(rngs, constant_init(1.0), (num_heads, head_dim),
                       ("heads", "head_dim"))
    self.bias = param(rngs, constant_init(0.0), (num_heads, head_dim),
                      ("heads", "head_dim"))

  def __call__(self, x, o_BxLxHxD):
    o = o_BxLxHxD.astype(jnp.float32)
    o = o - o.mean(-1, keepdims=True)
    o = o * jax.lax.rsqrt((o * o).mean(-1, keepdims=True) + self.eps)
    o = (o * self.scale[...] + self.bias[...]).astype(x.dtype)
    return jax.nn.silu(self.gate(x)) * o

  def flops_per_token(self) -> float:
    return 2.0 * self.gate.kernel.size
