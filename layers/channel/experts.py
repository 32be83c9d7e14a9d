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
    whole tiles of `tile` rows; every tile gathers its expert's weights and
    one batched matmul runs all tiles. The tile count is static (rows/tile
    + E), so the cost is (rows + E * tile) row-matmuls whatever the routing.
"""

from __future__ import annotations

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
    self.kind, self.num, self.hidden = kind, num_experts, hidden
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
  """Rows per tile: at most `tile`, and small enough that the padding (up
  to E tiles) stays within a quarter of the rows (a power of two >= 1)."""
  fit = max(1, rows // (4 * num_experts))
  return min(tile, 1 << (fit.bit_length() - 1))


def _tiled(w, x_MxD, counts_E, tile):
  M, D = x_MxD.shape
  E = counts_E.shape[0]
  m = tile_rows(M, E, tile)
  n_tiles = M // m + E  # >= sum_e ceil(counts_e / m)
  tiles_E = (counts_E + m - 1) // m
  first_tile_E = jnp.cumsum(tiles_E) - tiles_E
  group_start_E = jnp.cumsum(counts_E) - counts_E
  expert_M = jnp.repeat(jnp.arange(E), counts_E, total_repeat_length=M)
  pos_M = first_tile_E[expert_M] * m + jnp.arange(M) - group_start_E[expert_M]
  xs = jnp.zeros((n_tiles * m, D), x_MxD.dtype).at[pos_M].set(
      x_MxD, unique_indices=True).reshape(n_tiles, m, D)
  # Tiles past the last expert's run hold zeros; give them the last expert.
  tile_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(tiles_E), jnp.arange(n_tiles),
                                             side="right"), E - 1)
  wt = {k: v[tile_expert] for k, v in w.items()}
  out = mlp(wt, lambda k: jnp.einsum("nmd,ndh->nmh", xs, wt[k]),
            lambda h: jnp.einsum("nmh,nhd->nmd", h, wt["down"]))
  return out.reshape(n_tiles * m, D)[pos_M]


GROUPED = Op(
    "grouped_matmul",
    {"ragged_dot": Impl("ragged_dot", _ragged, lambda platform, **_: (
        "on cpu, ragged_dot is a dense emulation at num_experts x the FLOPs"
        if platform == "cpu" else None)),
     "tiled": Impl("tiled", _tiled)},
    {"gpu": ("ragged_dot", "tiled"), "tpu": ("ragged_dot", "tiled"),
     "default": ("tiled",)})
