"""Dispatch: running each token through the experts a router chose.

Three paths, all from the same `Routing` (layers/channel/routers.py) and
the experts' weights `w` (layers/channel/experts.py):

  dense      the pure-JAX reference: every expert on every token, summed
             with the gates (E times the FLOPs of the active experts).
             Every other path is tested against it.
  capacity   each row of tokens is one group; an expert takes at most
             `capacity` of a row's assignments, in priority order; the rest
             are dropped (their token gets nothing from that expert, so the
             block's residual carries it through). Tokens are packed into
             an [E, capacity] buffer per row, the experts run as one
             batched matmul, and the outputs are gathered back. Under
             a layout (`layers.parallel`) with an expert axis > 1 it runs
             inside `shard_map`: the buffers travel to their experts' devices and
             back with `all_to_all` over that axis.
  dropless   every assignment kept: the assignments of the whole batch are
             sorted by expert and multiplied group by group
             (`experts.GROUPED`), at the cost of the active parameters.

Groups are rows so that which tokens drop does not depend on how the batch
is split over devices: one device and eight drop the same tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from layers import parallel
from layers.channel.experts import GROUPED, batched, dense_all
from layers.channel.routers import Routing

F32 = jnp.float32
EXPERT_AXIS = "expert"  # the mesh axis expert parallelism shards experts over
DISPATCHES = ("dropless", "capacity", "dense")


def expert_layout() -> parallel.Layout | None:
  """The current layout if its expert axis is > 1. The batch is expected
  split over the layout's "batch" axes and expert weights over EXPERT_AXIS
  (train.sharding's layout); other layouts are resharded to those."""
  layout = parallel.current()
  if layout is None or layout.mesh.shape.get(EXPERT_AXIS, 1) == 1:
    return None
  return layout


def capacity_of(length: int, top_k: int, num_experts: int, factor: float) -> int:
  """Assignments an expert takes per row: ceil(factor * L * top_k / E), at
  least 1 and at most L (a token never picks an expert twice)."""
  return max(1, min(length, math.ceil(factor * length * top_k / num_experts)))


def dense(x_BxLxD: jax.Array, r: Routing, w: dict) -> jax.Array:
  """The reference: every expert on every token, weighted by the gates."""
  B, L, D = x_BxLxD.shape
  E = w["up"].shape[0]
  rows = jnp.arange(B)[:, None]
  combine_BxLxE = jnp.zeros((B, L, E), F32).at[rows, r.token, r.expert].add(r.gate)
  h = dense_all(w, x_BxLxD.reshape(B * L, D)).reshape(B, L, E, D)
  return jnp.einsum("ble,bled->bld", combine_BxLxE, h.astype(F32)).astype(x_BxLxD.dtype)


def _pack(x_LxD, r: Routing, capacity: int, E: int):
  """One row's [E, C, D] buffer; each assignment's flat slot (E*C if dropped)."""
  keep = r.slot < capacity
  dest = jnp.where(keep, r.expert * capacity + r.slot, E * capacity)
  buf = jnp.zeros((E * capacity + 1, x_LxD.shape[-1]), x_LxD.dtype)
  buf = buf.at[dest].set(x_LxD[r.token])
  return buf[:-1].reshape(E, capacity, -1), dest


def _unpack(out_ExCxD, r: Routing, dest, L: int):
  E, C, D = out_ExCxD.shape
  flat = jnp.concatenate([out_ExCxD.reshape(E * C, D), jnp.zeros((1, D), out_ExCxD.dtype)])
  gate = jnp.where(dest < E * C, r.gate, 0.0)
  return jnp.zeros((L, D), F32).at[r.token].add(flat[dest].astype(F32) * gate[:, None])


def _capacity(x_BxLxD, r: Routing, capacity: int, E: int, run):
  """Pack every row, `run` [B, E, C, D] -> [B, E, C, D] through the experts,
  and combine."""
  no_probs = r.replace(probs=None)
  buf, dest = jax.vmap(lambda x, r: _pack(x, r, capacity, E))(x_BxLxD, no_probs)
  out = run(buf)
  L = x_BxLxD.shape[1]
  y = jax.vmap(lambda o, r, d: _unpack(o, r, d, L))(out, no_probs, dest)
  return y.astype(x_BxLxD.dtype)


def _run_local(w):
  def run(buf_BxExCxD):
    B, E, C, D = buf_BxExCxD.shape
    y = batched(w, jnp.swapaxes(buf_BxExCxD, 0, 1).reshape(E, B * C, D))
    return jnp.swapaxes(y.reshape(E, B, C, D), 0, 1)
  return run


def _run_sharded(w):
  """Inside shard_map: send each expert's slice of the local buffers to the
  device holding that expert, run the local experts on what arrives from
  the whole expert axis, and send the outputs back."""
  def run(buf_BxExCxD):
    got = jax.lax.all_to_all(buf_BxExCxD, EXPERT_AXIS, 1, 0, tiled=True)
    return jax.lax.all_to_all(_run_local(w)(got), EXPERT_AXIS, 0, 1, tiled=True)
  return run


def capacity(x_BxLxD: jax.Array, r: Routing, w: dict, cap: int) -> jax.Array:
  """Capacity dispatch with `cap` slots per expert and row (see module doc)."""
  E = w["up"].shape[0]
  layout = expert_layout()
  if layout is None:
    return _capacity(x_BxLxD, r, cap, E, _run_local(w))
  batch = layout.spec(parallel.BATCH)  # rows whole: capacity is per row
  local = lambda x, r, w: _capacity(x, r, cap, E, _run_sharded(w))
  return jax.shard_map(local, mesh=layout.mesh, in_specs=(batch, batch, P(EXPERT_AXIS)),
                       out_specs=batch)(x_BxLxD, r.replace(probs=None), w)


def dropless(x_BxLxD: jax.Array, r: Routing, w: dict, *, kernel: str, tile: int
             ) -> jax.Array:
  """Every assignment of the batch, sorted by expert, through GROUPED."""
  B, L, D = x_BxLxD.shape
  E = w["up"].shape[0]
  row = (jnp.arange(B)[:, None] * L + r.token).reshape(-1)
  expert = r.expert.reshape(-1)
  order = jnp.argsort(expert, stable=True)
  counts_E = jnp.bincount(expert, length=E)
  ys = GROUPED.choose(kernel).fn(w, x_BxLxD.reshape(B * L, D)[row[order]],
                                 counts_E, tile)
  contrib = ys.astype(F32) * r.gate.reshape(-1)[order][:, None]
  y = jnp.zeros((B * L, D), F32).at[row[order]].add(contrib)
  return y.reshape(B, L, D).astype(x_BxLxD.dtype)


def dropped_fraction(r: Routing, capacity: int | None) -> jax.Array:
  """Fraction of the assignments over capacity (0 without one)."""
  if capacity is None:
    return jnp.zeros((), F32)
  return jnp.mean((r.slot >= capacity).astype(F32))
