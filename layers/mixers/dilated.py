"""Dilated attention, LongNet (Ding et al., 2023), causal."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from layers.blocks.attention import AttentionOptions
from layers.blocks.sparse import (FarSparse, causal, check_positive, own_block,
                                  pos_meta)
from layers.kernels.block_sparse import cdiv, merge
from layers.mixers import register
from layers.mixers.base import MixerInfo


@register("dilated")
class Dilated(FarSparse):
  """Dilated attention, LongNet (Ding et al., 2023, arXiv:2307.02486),
  causal.

  For each branch (w, r) of segment_lengths x dilation_rates the sequence is
  cut into segments of w; in every segment, head h keeps every r-th
  position starting at offset h mod r (the paper's per-head shift) and
  runs causal softmax attention among them. Branches are merged
  by their softmax denominators, o = sum_i s_i o_i / sum_i s_i, as in the
  paper (a key found by two branches counts twice). A position that a
  branch skips for a head gets nothing from it; a rate of 1 is required so
  that every position is covered.

  Computed blockwise: a head's kept positions of one segment form one
  block. Cost: a branch costs w / r^2 keys per query, so training is O(L)
  (linear) for fixed (w, r). Keys never reach back more than max(w) - 1
  positions, so a ring of that size would bound decode memory; this
  implementation keeps the full KV cache (O(L) memory, O(sum w/r) keys read
  per token).

  Options: segment_lengths, dilation_rates (same length, r divides w, one
  rate 1); defaults (2048, 4096, 8192) x (1, 2, 4) are the first three
  branches of the paper's language-model setting (w up to 32768 with
  r = 1, 2, 4, 6, 12; r = 6 does not divide 16384 here). The rest
  (`AttentionOptions`) as for `attention`.
  """

  info = MixerInfo(family="attention", paper="Ding et al. 2023, "
                   "arXiv:2307.02486", train_cost="linear",
                   decode_state="length", supports_segments=False)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs,
               segment_lengths: tuple[int, ...] = (2048, 4096, 8192),
               dilation_rates: tuple[int, ...] = (1, 2, 4),
               attn: AttentionOptions = AttentionOptions()):
    super().__init__(d_model, rngs=rngs, attn=attn)
    if not segment_lengths or len(segment_lengths) != len(dilation_rates):
      raise ValueError(
          f"dilated: segment_lengths {tuple(segment_lengths)} and "
          f"dilation_rates {tuple(dilation_rates)} must be non-empty and of "
          "the same length (one (w, r) per branch)")
    for w, r in zip(segment_lengths, dilation_rates):
      check_positive(self.name, segment_length=w, dilation_rate=r)
      if w % r:
        raise ValueError(f"dilated: dilation rate {r} must divide segment "
                         f"length {w}")
    if 1 not in dilation_rates:
      raise ValueError(f"dilated: dilation_rates {tuple(dilation_rates)} need a "
                       "rate of 1, else some (position, head) sees no key")
    self.branches = tuple(zip(segment_lengths, dilation_rates))

  def mix(self, q, k, v, q_start, full):
    k = jnp.repeat(k, self.num_heads // self.num_kv_heads, axis=2)
    v = jnp.repeat(v, self.num_heads // self.num_kv_heads, axis=2)
    return merge([self._branch(q, k, v, q_start, full, w, r)
                  for w, r in self.branches])

  def _branch(self, q, k, v, q_start, full, w, r):
    """One (w, r): keys laid out per head, a segment's kept positions as one
    block. The full form lays queries out the same way; an incremental
    piece reads its segment's block per query."""
    S, H = k.shape[1], self.num_heads
    seg = w if S > w else cdiv(S, r) * r  # a lone segment needs no more
    per = seg // r
    shift = jnp.arange(H) % r  # [H]
    lay_pos = (seg * jnp.arange(cdiv(S, seg))[:, None, None]
               + r * jnp.arange(per)[None, :, None] + shift).reshape(-1, H)
    lay_pos = jnp.where(lay_pos < S, lay_pos, -1)  # [n, H]
    lay = lambda x: jnp.take_along_axis(
        x, jnp.maximum(lay_pos, 0)[None, :, :, None], axis=1)
    km = {"pos": lay_pos.T[None]}
    if not full:
      t = q_start + jnp.arange(q.shape[1])
      kept = ((t % w) % r)[None, :] == shift[:, None]  # [H, Lq]
      return self.attend(
          q, lay(k), lay(v), table_fn=lambda qb: (qb // w)[:, None],
          mask_fn=lambda qm, km: qm["kept"] & causal(qm, km),
          q_meta={"pos": pos_meta(t), "kept": kept[None]}, k_meta=km,
          block_q=1, block_k=per, q_start=q_start)
    o, lse = self.attend(lay(q), lay(k), lay(v), table_fn=own_block,
                         mask_fn=causal, q_meta=km, k_meta=km, block_q=per,
                         block_k=per)
    t = jnp.arange(S)[:, None]
    back = (t // seg) * per + (t % seg) // r  # [S, H]
    kept = (t % seg) % r == shift
    o = jnp.take_along_axis(o, back[None, :, :, None], axis=1)
    lse = jnp.take_along_axis(lse, back[None], axis=1)
    return jnp.where(kept[..., None], o, 0), jnp.where(kept, lse, -jnp.inf)

  def flops_per_token(self, seq_len):
    keys = sum(min(w, seq_len) / r ** 2 for w, r in self.branches)
    return self.flops_for_keys(keys)
