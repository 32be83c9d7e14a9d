"""Block-sparse softmax attention: each query block attends a few gathered
key blocks.

The shared core of the sparse-attention mixers (sliding window, sinks,
strided, BigBird, dilated, LSH). A pattern is given as

  * `table_fn(qb) -> [Q, N]` or `[H, Q, N]` int32: for the absolute
    query-block indices qb [Q], the key-block indices each block attends,
    one table for all heads or one per query head (entries outside [0,
    number of key blocks) mean "no block"; a row must not list a block
    twice). With per-head tables and grouped kv heads (G < H), each query
    head's key blocks are gathered separately (H / G times the key
    memory); a shared table gathers each kv head's blocks once;
  * `mask_fn(qm, km) -> bool`: the exact per-pair mask inside the gathered
    blocks, from metadata (positions, segment ids, buckets, ...). Every
    metadata leaf is [b, h, length] (b in {1, B}, h in {1, H}); the kernel
    hands the function query leaves [b, h, Q, block_q, 1] and gathered key
    leaves [b, h, Q, 1, N * block_k] (h = H with per-head tables), and the
    result must broadcast to
    [b, h, Q, block_q, N * block_k]. Padded keys and missing blocks are
    masked by the kernel itself.
  * `bias_fn(qm, km)` (optional): an additive fp32 score bias, same shapes.

Work and memory are O(Lq * N * block_k): nothing of size Lq x Lk exists.
`q_start` is the key index of the first query (0 for a full sequence, the
cache position for an incremental piece, static or traced); queries are
padded on the left so that query blocks line up with absolute blocks, which
keeps a pattern's block structure identical in both forms.

Scores and softmax are fp32; probabilities are cast to the value dtype for
the second matmul (as in `layers.kernels.attention.reference`). Every call
returns the normalised output and the log-sum-exp of the scores, so
patterns made of several parts (sinks + window, dilation branches, hash
rounds) combine exactly with `merge`.

The "gather" implementation is pure JAX (it materialises the gathered key
blocks); a Pallas kernel that reads blocks in place slots into `BLOCK_SPARSE`
with the same signature (both table shapes included).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from layers.kernels import Impl, Op

Meta = dict[str, jax.Array]


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def query_blocks(q_start, length: int, block: int):
  """(left pad, absolute query-block indices [Q]) for `length` queries
  starting at key index `q_start`. A traced start reserves room for any
  misalignment."""
  pad = q_start % block
  slack = pad if isinstance(q_start, int) else block - 1
  return pad, q_start // block + jnp.arange(cdiv(length + slack, block),
                                            dtype=jnp.int32)


def _place(x: jax.Array, axis: int, size: int, offset) -> jax.Array:
  """x placed at `offset` along `axis` in zeros of length `size`."""
  shape = list(x.shape)
  shape[axis] = size
  start = [0] * x.ndim
  start[axis] = offset
  return jax.lax.dynamic_update_slice(jnp.zeros(shape, x.dtype), x, start)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _heads(x: jax.Array, G: int, R: int) -> jax.Array:
  """[b, h, ...] with h in {1, G*R} -> [b, G|1, R|1, ...] (score layout)."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], G, R, *x.shape[2:])


def gather(q, k, v, *, table_fn: Callable, mask_fn: Callable, q_meta: Meta,
           k_meta: Meta, block_q: int, block_k: int, q_start=0,
           bias_fn: Callable | None = None, scale: float | None = None):
  """Block-sparse attention by gathering key blocks (see module doc).

  q [B, Lq, H, K]; k, v [B, S, G, K] with H a multiple of G.
  Returns o [B, Lq, H, K] (dtype of q) and lse [B, Lq, H] fp32 (-inf where
  a query sees no key; its output is 0).
  """
  B, Lq, H, K = q.shape
  S, G = k.shape[1], k.shape[2]
  scale = K ** -0.5 if scale is None else scale
  pad, qb = query_blocks(q_start, Lq, block_q)
  Q = qb.shape[0]
  table = table_fn(qb)
  per_head = table.ndim == 3
  if table.shape[per_head:-1] != (Q,) or (per_head and table.shape[0] != H):
    raise ValueError(f"block_sparse: table_fn must return [Q, N] or [H, Q, N] "
                     f"with Q={Q} query blocks and H={H} heads, got "
                     f"{table.shape}")
  if per_head and G < H:  # each query head reads its own kv blocks
    k, v = jnp.repeat(k, H // G, axis=2), jnp.repeat(v, H // G, axis=2)
    G = H
  R = H // G
  nK = cdiv(S, block_k)
  have = (table >= 0) & (table < nK)
  if table.shape[-1] > nK:
    # A row lists each block at most once, so at most nK of its entries are
    # real: keep those (sorted first) and drop the rest. A pattern sized for
    # long inputs (a 4096-token window, 33 key blocks) then costs a short
    # sequence its own blocks only, not N times its keys.
    table = jnp.sort(jnp.where(have, table, nK), axis=-1)[..., :nK]
    have = table < nK
  N = table.shape[-1]
  table = jnp.clip(table, 0, nK - 1)
  # The head of each table entry, for indexing a [.., H, nK, ..] array.
  head = jnp.arange(H)[:, None, None] if per_head else None

  q_QxbqxGxRxK = _place(q, 1, Q * block_q, pad).reshape(B, Q, block_q, G, R, K)
  def key_blocks(x):  # [B, S, G, K] -> [B, Q, N * block_k, G, K]
    x = _pad_to(x, 1, nK * block_k).reshape(B, nK, block_k, G, K)
    if per_head:  # [B, H, Q, N, block_k, K] -> [B, Q, N, block_k, H, K]
      x = jnp.moveaxis(jnp.moveaxis(x, 3, 1)[:, head, table], 1, 4)
    else:
      x = x[:, table]
    return x.reshape(B, Q, N * block_k, G, K)
  k_QxNbkxGxK, v_QxNbkxGxK = key_blocks(k), key_blocks(v)

  def key_meta(m):  # [b, h, S] -> [b, h|H, Q, 1, N * block_k]
    m = _pad_to(m, 2, nK * block_k).reshape(*m.shape[:2], nK, block_k)
    if per_head:
      m = jnp.broadcast_to(m, (m.shape[0], H, nK, block_k))[:, head, table]
    else:
      m = m[:, :, table]
    return m.reshape(*m.shape[:2], Q, 1, N * block_k)
  qm = {n: _place(m, 2, Q * block_q, pad).reshape(*m.shape[:2], Q, block_q, 1)
        for n, m in q_meta.items()}
  km = {n: key_meta(m) for n, m in k_meta.items()}
  key_idx = table[..., None] * block_k + jnp.arange(block_k)
  real = (have[..., None] & (key_idx < S)).reshape(*table.shape[:-1], 1,
                                                  N * block_k)
  mask = _heads(mask_fn(qm, km) & real, G, R)  # [b, G|1, R|1, Q, bq, Nbk]

  s = jnp.einsum("bqigrk,bqjgk->bgrqij", q_QxbqxGxRxK, k_QxNbkxGxK,
                 preferred_element_type=jnp.float32) * scale
  if bias_fn is not None:
    s = s + _heads(bias_fn(qm, km).astype(jnp.float32), G, R)
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(s - m)  # exactly 0 where masked
  l = p.sum(-1, keepdims=True)
  seen = l > 0
  p = p / jnp.where(seen, l, 1.0)
  o = jnp.einsum("bgrqij,bqjgk->bqigrk", p.astype(v.dtype), v_QxNbkxGxK)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[..., 0]
  o = jax.lax.dynamic_slice_in_dim(o.reshape(B, Q * block_q, H, K), pad, Lq, 1)
  lse = lse.transpose(0, 3, 4, 1, 2).reshape(B, Q * block_q, H)
  lse = jax.lax.dynamic_slice_in_dim(lse, pad, Lq, 1)
  return o.astype(q.dtype), lse


def merge(parts: list[tuple[jax.Array, jax.Array]]) -> jax.Array:
  """Combine attention outputs over disjoint key sets (or a multiset, as in
  LongNet and Reformer) into the softmax over their union: weights are the
  parts' softmax denominators exp(lse)."""
  if len(parts) == 1:
    return parts[0][0]
  lse = jnp.stack([l for _, l in parts])  # [P, B, L, H]
  top = jnp.max(lse, 0)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  w = jnp.exp(lse - top)
  total = w.sum(0)
  w = w / jnp.where(total > 0, total, 1.0)
  o = sum(wi[..., None] * o.astype(jnp.float32) for wi, (o, _) in zip(w, parts))
  return o.astype(parts[0][0].dtype)


BLOCK_SPARSE = Op(
    "block_sparse",
    impls={"gather": Impl("gather", gather)},
    order={"default": ("gather",)},
)
