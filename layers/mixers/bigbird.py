"""BigBird block-sparse attention (Zaheer et al., 2020), causal."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from layers.blocks.attention import AttentionOptions
from layers.blocks.sparse import (FarSparse, Fixed, causal, check_nonnegative,
                                  check_positive)
from layers.mixers import register
from layers.mixers.base import MixerInfo


def random_blocks(key_data, qb, lo, hi, count: int, heads: int):
  """`count` distinct blocks drawn from [lo, hi[b]) for every head h and
  query block b: [heads, Q, count] (Floyd's algorithm; the modulo bias is
  below 2^-20 for < 4096 blocks), -1 where fewer exist. A pure function of
  (key, h, b), so every call and every form draws the same blocks."""
  if count == 0:
    return jnp.zeros((heads, qb.shape[0], 0), jnp.int32)
  key = jax.random.wrap_key_data(key_data)
  draw = lambda h, b: jax.random.bits(
      jax.random.fold_in(jax.random.fold_in(key, h), b), (count,))
  bits = jax.vmap(lambda h: jax.vmap(lambda b: draw(h, b))(qb))(
      jnp.arange(heads))  # [heads, Q, count]
  chosen = []
  for j in range(count):
    m = hi - lo - count + j  # Floyd: draw t in [0, m]; if taken, take m
    t = (bits[..., j] % jnp.maximum(m + 1, 1).astype(jnp.uint32)).astype(jnp.int32)
    taken = functools.reduce(jnp.logical_or, [t == c for c in chosen],
                             jnp.zeros_like(t, bool))
    chosen.append(jnp.where(m >= 0, jnp.where(taken, m, t), -1))
  chosen = jnp.stack(chosen, axis=-1)
  return jnp.where(chosen >= 0, lo + chosen, -1).astype(jnp.int32)


@register("bigbird")
class BigBird(FarSparse):
  """BigBird block-sparse attention (Zaheer et al., 2020, arXiv:2007.14062),
  causal (as for decoders): query block i reads

    its own block and the `window` blocks before it,
    the first `global_blocks` blocks (global tokens),
    `random_blocks` blocks drawn from the rest of its past, per head (as
    in the paper, each head draws its own),

  with a causal mask inside; o_t is the softmax over those keys. The random
  choice is fixed at init from `rngs` (a stored key, not a parameter) and is
  a function of the (head, block) index, so any sequence length works and
  the full and incremental forms agree. Causal global tokens see only their
  past, which lies in the global blocks themselves.

  Cost: (window + 1 + global + random) * block_size keys per query, so
  training is O(L) (linear). The global and random blocks reach back
  arbitrarily far, so decode keeps the full KV cache (O(L) memory, a
  constant number of key blocks read per token). With random blocks and
  grouped kv heads, every query head gathers its own key blocks.

  Options: block_size, window, global_blocks, random_blocks; defaults are
  BigBird-ITC's: blocks of 64, a window of 3 blocks (its causal half: the
  own block and 1 before), 2 global and 3 random blocks. The rest
  (`AttentionOptions`) as for `attention`.
  """

  info = MixerInfo(family="attention", paper="Zaheer et al. 2020, "
                   "arXiv:2007.14062", train_cost="linear",
                   decode_state="length", supports_segments=False)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, block_size: int = 64,
               window: int = 1, global_blocks: int = 2, random_blocks: int = 3,
               attn: AttentionOptions = AttentionOptions()):
    super().__init__(d_model, rngs=rngs, attn=attn)
    check_positive(self.name, block_size=block_size)
    check_nonnegative(self.name, window=window, global_blocks=global_blocks,
                      random_blocks=random_blocks)
    self.block, self.window = block_size, window
    self.global_blocks, self.random_blocks = global_blocks, random_blocks
    self.pattern_key = Fixed(jax.random.key_data(rngs.params()))

  def table(self, qb):
    """[H, Q, N] block table (one per head), or [Q, N] for all heads when
    no random blocks are drawn."""
    w, g = self.window, self.global_blocks
    first_local = qb[:, None] - w
    local = first_local + jnp.arange(w + 1, dtype=jnp.int32)
    glob = jnp.arange(g, dtype=jnp.int32)[None, :]
    glob = jnp.where(glob < first_local, glob, -1)  # else in the window
    shared = jnp.concatenate([glob, local], axis=1)
    if not self.random_blocks:
      return shared
    H = self.num_heads
    rand = random_blocks(self.pattern_key[...], qb, g, qb - w,
                         self.random_blocks, H)
    return jnp.concatenate([jnp.broadcast_to(shared, (H, *shared.shape)), rand],
                           axis=-1)

  def mix(self, q, k, v, q_start, full):
    qm, km = self.metas(q, k, q_start)
    return self.attend(q, k, v, table_fn=self.table, mask_fn=causal, q_meta=qm,
                       k_meta=km, block_q=self.block, block_k=self.block,
                       q_start=q_start)[0]

  def flops_per_token(self, seq_len):
    blocks = self.window + 1 + self.global_blocks + self.random_blocks
    return self.flops_for_keys(blocks * self.block)
