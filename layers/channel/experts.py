"""The experts of a mixture of experts: E MLPs with stacked weights, and
the grouped matmul that runs tokens sorted by expert through them.

Weights are [E, ...] arrays with the logical axis "experts" first, so
expert parallelism shards them over the mesh's expert axis. An expert is
a SwiGLU (down(silu(gate x) * up x)) or a GELU MLP (down(gelu(up x))).

`GROUPED` (a `layers.kernels.Op`) multiplies rows sorted by expert, group
by group, at the cost of the rows (active parameters), not of E:
  * "ragged_dot": `jax.lax.ragged_dot`, a grouped GEMM on GPU and TPU. It
    declines on CPU, where XLA emulates it densely at E times the FLOPs.
  * "tiled": pure JAX for every platform. Each expert's rows are padded to
    whole tiles (`tile_rows`: at most `tile` rows, fewer for many experts
    and few rows); a loop runs the tiles in use, each through its expert's
    weights read in place, with a hand-written backward pass. Cost: the rows
    plus on average half a tile per expert.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from layers.kernels import Impl, Op
from layers.params import fan_in_init, param

EXPERT_KINDS = ("swiglu", "gelu")


class Experts(nnx.Module):
  """E expert MLPs of width d_model and hidden `hidden`, fp32 master
  weights; kind is one of EXPERT_KINDS (checked by the MoE layer)."""

  def __init__(self, num_experts: int, d_model: int, hidden: int, *,
               kind: str, rngs: nnx.Rngs):
    self.hidden = hidden
    up = lambda: param(rngs, fan_in_init(d_model), (num_experts, d_model, hidden),
                       ("experts", "embed", "mlp"))
    self.gate = up() if kind == "swiglu" else None
    self.up = up()
    self.down = param(rngs, fan_in_init(hidden), (num_experts, hidden, d_model),
                      ("experts", "mlp", "embed"))

  def weights(self, dtype) -> dict:
    """The weights as arrays in the compute dtype (a pytree for shard_map)."""
    out = {"up": self.up[...], "down": self.down[...]}
    if self.gate is not None:
      out["gate"] = self.gate[...]
    return {k: v.astype(dtype) for k, v in out.items()}

  def flops_per_token(self) -> float:
    """Forward FLOPs of one expert on one token."""
    return 2.0 * self.up.shape[1] * self.hidden * (3 if self.gate is not None else 2)


def mlp(w: dict, up, down) -> jax.Array:
  """One expert MLP from its matmuls: up(name) = x @ w[name] for the input
  projections ("up", and "gate" for SwiGLU), down(h) = h @ w["down"]."""
  h = up("up")
  h = jax.nn.silu(up("gate")) * h if "gate" in w else jax.nn.gelu(h)
  return down(h)


def batched(w: dict, x_ExNxD: jax.Array) -> jax.Array:
  """Every expert on its own rows: x [E, N, D] -> [E, N, D]."""
  return mlp(w, lambda k: jnp.einsum("end,edh->enh", x_ExNxD, w[k]),
             lambda h: jnp.einsum("enh,ehd->end", h, w["down"]))


def dense_all(w: dict, x_TxD: jax.Array) -> jax.Array:
  """Every expert on every row: x [T, D] -> [T, E, D] (E times the cost)."""
  return mlp(w, lambda k: jnp.einsum("td,edh->teh", x_TxD, w[k]),
             lambda h: jnp.einsum("teh,ehd->ted", h, w["down"]))


def _ragged(w, x_MxD, counts_E, tile):
  del tile
  return mlp(w, lambda k: jax.lax.ragged_dot(x_MxD, w[k], counts_E),
             lambda h: jax.lax.ragged_dot(h, w["down"], counts_E))


def tile_rows(rows: int, num_experts: int, tile: int) -> int:
  """Rows per tile: at most `tile`, and small enough that the padding (half
  a tile per expert on average) stays within an eighth of the rows (a power
  of two >= 1). Smaller tiles waste less but multiply less efficiently."""
  fit = max(1, rows // (4 * num_experts))
  return min(tile, 1 << (fit.bit_length() - 1))


def _tile_mlp(we: dict, x_mxD: jax.Array) -> jax.Array:
  return mlp(we, lambda k: x_mxD @ we[k], lambda h: h @ we["down"])


def _tile(w: dict, xs, tile_expert, i, m: int):
  """Tile i's expert weights and rows."""
  e = tile_expert[i]
  return e, {k: v[e] for k, v in w.items()}, jax.lax.dynamic_slice_in_dim(xs, i * m, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tile_loop(w: dict, xs_NxD, tile_expert, used, m: int):
  """Each of the first `used` tiles of m rows of xs through its expert, one
  tile after another (a loop of dynamic length: tiles past `used`, there
  for the worst-case routing, cost nothing). The backward pass is written
  out so that each tile adds its weight gradient into its expert's slice
  in place; autodiff of a loop over tiles would add a full [E, ...]
  gradient per tile."""
  def body(i, out):
    _, we, xt = _tile(w, xs_NxD, tile_expert, i, m)
    return jax.lax.dynamic_update_slice_in_dim(out, _tile_mlp(we, xt), i * m, 0)
  return jax.lax.fori_loop(0, used, body, jnp.zeros_like(xs_NxD))


def _tile_loop_fwd(w, xs, tile_expert, used, m):
  return _tile_loop(w, xs, tile_expert, used, m), (w, xs, tile_expert, used)


def _tile_loop_bwd(m, res, dout):
  w, xs, tile_expert, used = res

  def body(i, carry):
    dxs, dw = carry
    e, we, xt = _tile(w, xs, tile_expert, i, m)
    _, vjp = jax.vjp(_tile_mlp, we, xt)
    dwe, dxt = vjp(jax.lax.dynamic_slice_in_dim(dout, i * m, m))
    dw = {k: jax.lax.dynamic_update_index_in_dim(
        dw[k], dw[k][e] + dwe[k].astype(jnp.float32), e, 0) for k in dw}
    return jax.lax.dynamic_update_slice_in_dim(dxs, dxt, i * m, 0), dw

  # Weight gradients summed over tiles in fp32 (bf16 sums drift).
  zeros = (jnp.zeros_like(xs), {k: jnp.zeros(v.shape, jnp.float32) for k, v in w.items()})
  dxs, dw = jax.lax.fori_loop(0, used, body, zeros)
  return {k: dw[k].astype(w[k].dtype) for k in w}, dxs, None, None


_tile_loop.defvjp(_tile_loop_fwd, _tile_loop_bwd)


def _tiled(w, x_MxD, counts_E, tile):
  M, D = x_MxD.shape
  E = counts_E.shape[0]
  m = tile_rows(M, E, tile)
  n_tiles = M // m + E  # >= sum_e ceil(counts_e / m), whatever the routing
  tiles_E = (counts_E + m - 1) // m
  first_tile_E = jnp.cumsum(tiles_E) - tiles_E
  group_start_E = jnp.cumsum(counts_E) - counts_E
  expert_M = jnp.repeat(jnp.arange(E), counts_E, total_repeat_length=M)
  pos_M = first_tile_E[expert_M] * m + jnp.arange(M) - group_start_E[expert_M]
  xs = jnp.zeros((n_tiles * m, D), x_MxD.dtype).at[pos_M].set(x_MxD, unique_indices=True)
  tile_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(tiles_E), jnp.arange(n_tiles),
                                             side="right"), E - 1)
  return _tile_loop(w, xs, tile_expert, jnp.sum(tiles_E), m)[pos_M]


GROUPED = Op(
    "grouped_matmul",
    {"ragged_dot": Impl("ragged_dot", _ragged, lambda platform, **_: (
        "on cpu, ragged_dot is a dense emulation at num_experts x the FLOPs"
        if platform == "cpu" else None)),
     "tiled": Impl("tiled", _tiled)},
    {"gpu": ("ragged_dot", "tiled"), "tpu": ("ragged_dot", "tiled"),
     "default": ("tiled",)})
