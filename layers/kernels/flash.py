"""Blockwise softmax attention in pure JAX: FlashAttention's algorithm as the
XLA path (CPU, and the fallback on GPU/TPU).

FlashAttention (Dao et al., 2022, arXiv:2205.14135) with the loop order and
backward of FlashAttention-2 (Dao, 2023, arXiv:2307.08691). Queries go in
blocks of `block_q`; each query block visits only the blocks of `block_k`
keys it can see (key blocks above the causal diagonal or outside a sliding
window are never computed) and keeps an online softmax in fp32:

  m' = max(m, rowmax S_j),  P_j = exp(S_j - m'),
  l' = exp(m - m') l + rowsum P_j,  acc' = exp(m - m') acc + P_j V_j,
  o = acc / l,  lse = m + log l.

The backward (`jax.custom_vjp`) recomputes each score block from q, k and
the saved lse rather than storing probabilities: with D = rowsum(dO * O),
dP = dO V^T and dS = P * (dP - D), each key block accumulates dV = P^T dO
and dK = dS^T Q over the query blocks that see it, while dQ += dS K. Memory
is O(L d) in both passes: one [block_q, block_k] score block per head at a
time beside q, k, v, o, lse and the gradients. With bf16 inputs P and dS
enter the matmuls in bf16, as in FlashAttention; the statistics and every
accumulator stay fp32.

Causal, window, segment and last-block padding masks, the ALiBi bias and
the soft-cap are computed per block from positions and ids. The loop bounds
depend on the block index, so the inner loops are `while` loops with traced
trip counts; a traced `q_offset` (decoding from a KV cache) runs the same
code and visits only the cache blocks written so far.

Cost, causal, T = S = L: about L^2 / 2 score entries (plus the masked half
of the diagonal blocks), 2 matmuls per visited block forward, 5 backward
(the scores recomputed); with a window W: O(L (W + block_k)) entries.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from layers.kernels import attention_call, chunks

# Forward+backward CPU time on a 2-core x86 CPU, L = 4K and 16K, 4 heads of
# 16, and head dims 64 and 128 at 4K: 256 x 256 blocks are the best overall.
# 512 x 512 ran the backward 1.3-1.5x slower (the score blocks fall out of
# cache); 64 x 64 was 10-15% faster at head dim 16, 15% slower at 128.
BLOCK_Q = 256
BLOCK_K = 256


@attention_call.checked
def attention(q, k, v, **call):
  """Softmax attention computed block by block (semantics in
  `layers.kernels.attention_call`). `alibi_slopes` are constants: no
  gradient flows to them."""
  return attention_lse(q, k, v, **call)[0]


@attention_call.checked
def attention_lse(q, k, v, *, causal=True, q_offset=0, window=None,
                  q_segment_ids=None, kv_segment_ids=None, alibi_slopes=None,
                  softcap=None, scale=None, block_q=BLOCK_Q, block_k=BLOCK_K):
  """(o [B, T, H, K], lse [B, T, H] fp32): `attention` and each row's
  log-sum-exp of its scaled scores (-inf for a row that sees no key), both
  differentiable, so that partial results over disjoint key sets combine
  exactly (ring attention, `layers.kernels.context_parallel`)."""
  for name, size in (("block_q", block_q), ("block_k", block_k)):
    if not (isinstance(size, int) and size >= 1):
      raise ValueError(f"attention: {name} must be an int >= 1, got {size!r}")
  B, T, H, K = q.shape
  S, G = k.shape[1], k.shape[2]
  plan = Plan(causal=causal, window=window, softcap=softcap,
               scale=K ** -0.5 if scale is None else scale, T=T, S=S,
               bq=min(block_q, T), bk=min(block_k, S))
  qb = jnp.moveaxis(_split(q.reshape(B, T, G, H // G, K), plan.bq), 2, -2)
  kb, vb = (jnp.moveaxis(_split(a, plan.bk), 2, -2) for a in (k, v))
  segs = None
  if q_segment_ids is not None:
    segs = (_split(q_segment_ids, plan.bq), _split(kv_segment_ids, plan.bk))
  slopes = None
  if alibi_slopes is not None:
    slopes = jax.lax.stop_gradient(alibi_slopes.astype(jnp.float32))
    slopes = slopes.reshape(G, H // G)
  ob, lse = _blockwise(plan, qb, kb, vb, jnp.asarray(q_offset, jnp.int32), segs,
                       slopes)  # [nq, B, G, R, bq, K], [nq, B, G, R, bq]
  o = jnp.moveaxis(jnp.moveaxis(ob, -2, 2), 0, 1)  # [B, nq, bq, G, R, K]
  lse = jnp.moveaxis(jnp.moveaxis(lse, -1, 2), 0, 1)  # [B, nq, bq, G, R]
  lse = lse.reshape(B, -1, H)[:, :T]
  # The forward keeps +inf for rows that see no key (their recomputed
  # probabilities are 0); as a statistic such a row weighs nothing.
  return o.reshape(B, -1, H, K)[:, :T], jnp.where(lse == jnp.inf, -jnp.inf, lse)


def _split(x, size):
  """[B, L, ...] -> [n, B, size, ...], zero-padding L up to n * size."""
  return jnp.moveaxis(chunks.split(x, size), 1, 0)


def _div(x, n):
  """floor(x / n) for x >= -n, n > 0, without floor division (which Mosaic
  TPU lowers only knowing the chip generation)."""
  return jax.lax.div(x + n, n) - 1


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static shape of a call: options, lengths and block sizes; also
  what the Pallas kernels (`layers.kernels.pallas.flash_common`) visit."""
  causal: bool
  window: int | None
  softcap: float | None
  scale: float
  T: int
  S: int
  bq: int
  bk: int

  @property
  def nq(self):
    return -(-self.T // self.bq)

  @property
  def nk(self):
    return -(-self.S // self.bk)

  def key_blocks(self, i, q_offset):
    """[lo, hi): the key blocks that query block i can see."""
    first = q_offset + i * self.bq
    last = q_offset + jnp.minimum((i + 1) * self.bq, self.T) - 1
    hi = self.nk
    if self.causal:
      hi = jnp.clip(jax.lax.div(last, self.bk) + 1, 0, self.nk)
    lo = 0 if self.window is None else jnp.clip(
        _div(jnp.maximum(first - self.window + 1, -self.bk), self.bk), 0, self.nk)
    return lo, hi

  def query_blocks(self, j, q_offset):
    """[lo, hi): the query blocks that see some key of key block j."""
    first = j * self.bk
    last = jnp.minimum((j + 1) * self.bk, self.S) - 1
    lo = 0
    if self.causal:  # the first query row at or after the block's first key
      row = first - q_offset
      lo = jnp.where(row < self.T, jnp.clip(
          _div(jnp.maximum(row, -self.bq), self.bq), 0, self.nq), self.nq)
    hi = self.nq if self.window is None else jnp.clip(
        _div(jnp.maximum(last + self.window - 1 - q_offset, -self.bq),
             self.bq) + 1, 0, self.nq)
    return lo, hi

  def visible(self, q_pos, k_pos):
    """Which (query, key) positions the causal, window and key-padding
    rules let through (broadcast of q_pos and k_pos), or None for all."""
    rules = []
    if self.causal:
      rules.append(k_pos <= q_pos)
    if self.window is not None:
      rules.append(k_pos > q_pos - self.window)
    if self.S % self.bk:  # the last key block is padded
      rules.append(k_pos < self.S)
    return functools.reduce(jnp.logical_and, rules) if rules else None

  def scores(self, q_i, k_j, i, j, q_offset, segs_ij, slopes):
    """Masked fp32 scores [B, G, R, bq, bk] of query block i against key
    block j, and tanh(s / softcap) (for the backward) or None."""
    s = jnp.einsum("bgrqk,bgsk->bgrqs", q_i, k_j,
                   preferred_element_type=jnp.float32) * self.scale
    t = None
    if self.softcap is not None:
      t = jnp.tanh(s / self.softcap)
      s = self.softcap * t
    q_pos = q_offset + i * self.bq + jnp.arange(self.bq)[:, None]
    k_pos = j * self.bk + jnp.arange(self.bk)[None, :]
    if slopes is not None:
      s = s - slopes[:, :, None, None] * (q_pos - k_pos).astype(jnp.float32)
    visible = self.visible(q_pos, k_pos)
    if segs_ij is not None:
      q_seg, k_seg = segs_ij
      same = (q_seg[:, :, None] == k_seg[:, None, :])[:, None, None]
      visible = same if visible is None else visible & same
    if visible is not None:
      s = jnp.where(visible, s, -jnp.inf)
    return s, t


def _pick(segs, i, j):
  return None if segs is None else (segs[0][i], segs[1][j])


def _forward(plan, qb, kb, vb, q_offset, segs, slopes):
  """o blocks [nq, B, G, R, bq, K] and lse [nq, B, G, R, bq] fp32."""

  def query_block(_, xs):
    i, q_i = xs

    def key_block(j, carry):
      m, l, acc = carry
      s, _ = plan.scores(q_i, kb[j], i, j, q_offset, _pick(segs, i, j), slopes)
      m_new = jnp.maximum(m, s.max(-1))
      # A row that has seen no visible key yet keeps m = -inf; shift by 0.
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      rescale = jnp.exp(m - m_safe)
      acc = rescale[..., None] * acc + jnp.einsum(
          "bgrqs,bgsk->bgrqk", p.astype(vb.dtype), vb[j],
          preferred_element_type=jnp.float32)
      return m_new, rescale * l + p.sum(-1), acc

    stats = (jnp.full(q_i.shape[:-1], -jnp.inf, jnp.float32),
             jnp.zeros(q_i.shape[:-1], jnp.float32))
    init = (*stats, jnp.zeros(q_i.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(*plan.key_blocks(i, q_offset), key_block, init)
    seen = l > 0  # a row that sees no key returns 0
    o = acc / jnp.where(seen, l, 1.0)[..., None]
    # lse = +inf makes every recomputed probability of such a row 0.
    return None, (o.astype(qb.dtype), jnp.where(seen, m + jnp.log(l), jnp.inf))

  _, (ob, lse) = jax.lax.scan(query_block, None, (jnp.arange(plan.nq), qb))
  return ob, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(plan, qb, kb, vb, q_offset, segs, slopes):
  return _forward(plan, qb, kb, vb, q_offset, segs, slopes)


def _blockwise_fwd(plan, qb, kb, vb, q_offset, segs, slopes):
  ob, lse = _forward(plan, qb, kb, vb, q_offset, segs, slopes)
  return (ob, lse), (qb, kb, vb, ob, lse, q_offset, segs, slopes)


def _blockwise_bwd(plan, residuals, cotangents):
  qb, kb, vb, ob, lse, q_offset, segs, slopes = residuals
  dob, dlse = cotangents
  # d lse / d s = p, so an lse cotangent shifts dS = P * (dP - D) by it.
  delta = jnp.einsum("...k,...k->...", dob.astype(jnp.float32),
                     ob.astype(jnp.float32)) - dlse  # [nq, B, G, R, bq]

  def key_block(dq, xs):
    j, k_j, v_j = xs

    def query_block(i, carry):
      dk, dv, dq = carry
      q_i, do_i = qb[i], dob[i]
      s, t = plan.scores(q_i, k_j, i, j, q_offset, _pick(segs, i, j), slopes)
      p = jnp.exp(s - lse[i][..., None])
      dv = dv + jnp.einsum("bgrqs,bgrqk->bgsk", p.astype(do_i.dtype), do_i,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bgrqk,bgsk->bgrqs", do_i, v_j,
                      preferred_element_type=jnp.float32)
      ds = p * (dp - delta[i][..., None])
      if t is not None:  # d(c tanh(x / c)) = (1 - tanh^2) dx
        ds = ds * (1.0 - t * t)
      ds = (ds * plan.scale).astype(q_i.dtype)
      dq = dq.at[i].add(jnp.einsum("bgrqs,bgsk->bgrqk", ds, k_j,
                                   preferred_element_type=jnp.float32))
      dk = dk + jnp.einsum("bgrqs,bgrqk->bgsk", ds, q_i,
                           preferred_element_type=jnp.float32)
      return dk, dv, dq

    zeros = jnp.zeros(k_j.shape, jnp.float32)
    dk, dv, dq = jax.lax.fori_loop(*plan.query_blocks(j, q_offset), query_block,
                                   (zeros, zeros, dq))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32),
                              (jnp.arange(plan.nk), kb, vb))
  # q_offset, segment ids and (constant) ALiBi slopes get no cotangent.
  return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype),
          None, None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
