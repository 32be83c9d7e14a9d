"""Sparse Transformer attention, strided and fixed patterns (Child et al.,
2019)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from layers.blocks.attention import AttentionOptions
from layers.blocks.sparse import (FarSparse, causal, check_positive, in_window,
                                  one_block, own_block, pos_meta, window_table)
from layers.kernels.block_sparse import cdiv, merge
from layers.mixers import register
from layers.mixers.base import MixerInfo


@register("strided")
class Strided(FarSparse):
  """Sparse Transformer attention (Child et al., 2019, arXiv:1904.10509),
  causal, the two factorised patterns merged into one head set ("merged
  head" in the paper), with stride l:

    pattern="strided": keys t-l < s <= t, and s = t - k l (k >= 1);
    pattern="fixed":   keys in t's own block of l, and the last `summary`
                       positions of every earlier block.

  o_t is the softmax over that union. Local parts read one or two key
  blocks of l; the strided column is laid out column by column (one key
  block per column), the fixed summaries are gathered into one block.

  Cost: each query reads ~2l + L/l (strided) or l + summary*L/l (fixed)
  keys, so training is O(L^2/l): quadratic at a fixed stride, O(L sqrt(L))
  only when l grows like sqrt(L) as in the paper. The columns and
  summaries reach back to the start, so decode keeps the full KV cache
  (O(L) memory; O(l + L/l) keys read per token).

  Options: stride, pattern ("fixed" | "strided"), summary (fixed only,
  1..stride); defaults are the paper's enwik8 model: fixed, stride 128,
  summary 32. The rest (`AttentionOptions`) as for `attention`.
  """

  info = MixerInfo(family="attention", paper="Child et al. 2019, "
                   "arXiv:1904.10509", train_cost="quadratic",
                   decode_state="length", supports_segments=False)
  PATTERNS = ("fixed", "strided")

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, stride: int = 128,
               pattern: str = "fixed", summary: int = 32,
               attn: AttentionOptions = AttentionOptions()):
    super().__init__(d_model, rngs=rngs, attn=attn)
    if pattern not in self.PATTERNS:
      raise ValueError(f"strided: unknown pattern {pattern!r}; choose one of "
                       f"{self.PATTERNS}")
    check_positive(self.name, stride=stride, summary=summary)
    if summary > stride:
      raise ValueError(f"strided: summary={summary} must be <= stride={stride}")
    self.stride, self.pattern, self.summary = stride, pattern, summary

  def mix(self, q, k, v, q_start, full):
    l = self.stride
    qm, km = self.metas(q, k, q_start)
    if self.pattern == "strided":
      local = self.attend(q, k, v, table_fn=window_table(l, l),
                          mask_fn=functools.partial(in_window, window=l),
                          q_meta=qm, k_meta=km, block_q=l, block_k=l,
                          q_start=q_start)
      return merge([local, self._columns(q, k, v, qm, q_start, full)])
    local = self.attend(q, k, v, table_fn=own_block, mask_fn=causal,
                        q_meta=qm, k_meta=km, block_q=l, block_k=l,
                        q_start=q_start)
    return merge([local, self._summaries(q, k, v, qm, q_start)])

  def _columns(self, q, k, v, qm, q_start, full):
    """Keys s = t - k l, k >= 1: the sequence as rows of l, read by column.
    Keys are laid out column-major so that a column is one key block; the
    full form lays the queries out the same way (one query block per
    column), an incremental piece reads its column per query."""
    l, S = self.stride, k.shape[1]
    rows = cdiv(S, l)
    col_pos = (jnp.arange(l)[:, None] + l * jnp.arange(rows)).reshape(-1)
    col_pos = jnp.where(col_pos < S, col_pos, -1)
    lay = lambda x: jnp.take(x, jnp.maximum(col_pos, 0), axis=1)
    km = {"pos": pos_meta(col_pos)}
    earlier = lambda qm, km: (km["pos"] >= 0) & (km["pos"] < qm["pos"])
    if not full:
      return self.attend(q, lay(k), lay(v), table_fn=lambda qb: (qb % l)[:, None],
                         mask_fn=earlier, q_meta=qm, k_meta=km, block_q=1,
                         block_k=rows, q_start=q_start)
    o, lse = self.attend(lay(q), lay(k), lay(v), table_fn=own_block,
                         mask_fn=earlier, q_meta=km, k_meta=km, block_q=rows,
                         block_k=rows)
    t = jnp.arange(S)
    back = (t % l) * rows + t // l
    return jnp.take(o, back, axis=1), jnp.take(lse, back, axis=1)

  def _summaries(self, q, k, v, qm, q_start):
    """The last `summary` positions of every earlier block, gathered into
    one key block."""
    l, c, S = self.stride, self.summary, k.shape[1]
    pos = (l * jnp.arange(cdiv(S, l))[:, None] + l - c + jnp.arange(c)).reshape(-1)
    pos = jnp.where(pos < S, pos, -1)
    take = lambda x: jnp.take(x, jnp.maximum(pos, 0), axis=1)
    return self.attend(
        q, take(k), take(v), table_fn=one_block,
        mask_fn=lambda qm, km: (km["pos"] >= 0) & (km["pos"] // l < qm["pos"] // l),
        q_meta=qm, k_meta={"pos": pos_meta(pos)}, block_q=l,
        block_k=pos.shape[0], q_start=q_start)

  def flops_per_token(self, seq_len):
    blocks = cdiv(seq_len, self.stride)
    if self.pattern == "strided":
      keys = (cdiv(self.stride - 1, self.stride) + 1) * self.stride + blocks
    else:
      keys = self.stride + self.summary * blocks
    return self.flops_for_keys(keys)
