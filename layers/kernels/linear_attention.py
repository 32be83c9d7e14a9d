"""Causal linear attention with optional per-step decay, in three forms.

Per head, with a state S_t of shape [K, V] kept in fp32 (a bf16 running
sum loses the small late terms as it grows):

  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = S_t^T q_t

g_t <= 0 is the log decay: [B, L, H, 1] for one decay per head and step
(RetNet's gamma, Performer's stabilizer rescale) or [B, L, H, K] for one per key
channel (GLA's gates); None means no decay (Katharopoulos et al., 2020).
Where segment ids change the state restarts from zero, so packed rows give
the outputs of separate runs.

Forms (same outputs to fp32 rounding; `LINEAR_ATTENTION.names()`):
  parallel:  o = ((Q K^T) * D) V, D_ts = exp(b_t - b_s) for s <= t in the
             same segment, b = cumsum(g). O(L^2) time and memory.
  chunked:   the parallel form inside chunks of C tokens; the state is
             carried across chunks by a scan. O(L C) time.
  recurrent: the recurrence token by token. O(L) sequential steps.
  pallas_tpu, pallas_gpu: the chunked form as Pallas kernels
             (`layers.kernels.pallas.linear_attention_tpu` / `_gpu`).
"auto" takes the first form of the platform's order that accepts the
call: TPU pallas_tpu, GPU pallas_gpu, then chunked (chunked on CPU).

Every exponent taken is a difference b_t - b_s with s <= t, so it is <= 0
and nothing overflows however strong the decay. With per-channel decay the
[C, C, K] tensor exp(b_t - b_s) is only built inside sub-chunks of
SUB_CHUNK tokens; between sub-chunks the factors are split around the
sub-chunk boundary (both <= 1), as in GLA's secondary chunking.

All forms take q, k [B, L, H, K], v [B, L, H, V], log_decay [B, L, H, 1|K],
segment_ids [B, L] int32 and the state [B, H, K, V] fp32 before the first
token (it belongs to the first token's segment), compute in fp32 and
return (o [B, L, H, V] in v's dtype, final state [B, H, K, V] fp32).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from layers.kernels import Impl, Op, chunks
from layers.kernels.pallas import linear_attention_gpu as gpu_la
from layers.kernels.pallas import linear_attention_tpu as tpu_la

SUB_CHUNK = 16  # per-channel decay: exact [c, c, K] products only within c tokens


def _heads_first(x):
  """[B, L, H, D] -> [B, H, L, D] fp32."""
  return jnp.swapaxes(x, 1, 2).astype(jnp.float32)


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def _decayed_scores(q, k, bq, bk, mask):
  """A_ts = sum_k q_tk k_sk exp(bq_tk - bk_sk) where mask, else 0.

  q [..., T, K], k [..., S, K]; bq [..., T, G], bk [..., S, G] with G 1 or
  K; mask broadcastable to [..., T, S], True only where the exponent is
  <= 0. Masking before exp keeps exp(+large) out of values and gradients.
  """
  if bq.shape[-1] == 1:
    decay = jnp.exp(jnp.where(mask, bq - _t(bk), -jnp.inf))
    return (q @ _t(k)) * decay
  diff = bq[..., :, None, :] - bk[..., None, :, :]  # [..., T, S, K]
  decay = jnp.exp(jnp.where(mask[..., None], diff, -jnp.inf))
  return jnp.einsum("...tk,...sk,...tsk->...ts", q, k, decay)


def _chunk_scores(q, k, b, mask):
  """Decayed scores inside chunks: q, k [..., C, K], b [..., C, G]
  (cumulative log decay within the chunk), mask [..., C, C] -> [..., C, C].

  Per-channel decay: sub-chunks of c tokens; pairs inside one sub-chunk use
  the exact product, pairs across sub-chunks i > j factor exp(b_t - b_s) =
  exp(b_t - r_i) exp(r_i - b_s) around r_i, b just before sub-chunk i.
  """
  if b.shape[-1] == 1:
    return _decayed_scores(q, k, b, b, mask)
  C = q.shape[-2]
  c = math.gcd(C, SUB_CHUNK)
  n = C // c
  split = lambda x: x.reshape(*x.shape[:-2], n, c, x.shape[-1])
  qs, ks, bs = split(q), split(k), split(b)  # [..., n, c, K]
  ref = jnp.concatenate([jnp.zeros_like(bs[..., :1, -1:, :]),
                         bs[..., :-1, -1:, :]], axis=-3)  # [..., n, 1, K]
  q_off = qs * jnp.exp(bs - ref)
  before = jnp.tril(jnp.ones((n, n), bool), -1)[:, :, None, None]  # j < i
  k_exp = ref[..., :, None, :, :] - bs[..., None, :, :, :]  # [..., n, n, c, K]
  k_off = ks[..., None, :, :, :] * jnp.exp(jnp.where(before, k_exp, -jnp.inf))
  scores = jnp.einsum("...itk,...ijsk->...itjs", q_off, k_off)
  diag = _decayed_scores(qs, ks, bs, bs, jnp.tril(jnp.ones((c, c), bool)))
  scores = scores + diag[..., :, :, None, :] * jnp.eye(n)[:, None, :, None]
  return scores.reshape(*q.shape[:-2], C, C) * mask


def parallel(q, k, v, log_decay, segment_ids, state, *, chunk_size):
  """The O(L^2) form: one masked, decayed score matrix per head."""
  del chunk_size  # an option of the chunked form
  q, k, v, g = map(_heads_first, (q, k, v, log_decay))
  L = q.shape[2]
  b = jnp.cumsum(g, axis=2)  # [B, H, L, G]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, L, L]
  mask = (jnp.tril(jnp.ones((L, L), bool)) & same)[:, None]
  o = _decayed_scores(q, k, b, b, mask) @ v
  first = (segment_ids == segment_ids[:, :1])[:, None, :, None]  # [B, 1, L, 1]
  o = o + (q * jnp.exp(b) * first) @ state
  last = same[:, -1][:, None, :, None]  # keys in the last token's segment
  k_end = k * jnp.exp(b[:, :, -1:] - b) * last
  carry = jnp.exp(b[:, :, -1]) * first[:, :, -1]  # [B, H, G]
  return _out(o, v), carry[..., None] * state + _t(k_end) @ v


def chunked(q, k, v, log_decay, segment_ids, state, *, chunk_size):
  """Parallel inside chunks of min(chunk_size, L) tokens, a scan across."""
  B, L, H, _ = q.shape
  C = min(chunk_size, L)
  in_chunks = lambda x: jnp.moveaxis(chunks.split(x, C), 3, 1).astype(
      jnp.float32)  # [B, N, C, H, *] -> [B, H, N, C, *]
  q, k, vc, g = map(in_chunks, (q, k, v, log_decay))
  seg = chunks.split(segment_ids, C, mode="edge")  # [B, N, C]
  b = jnp.cumsum(g, axis=3)
  same = seg[..., :, None] == seg[..., None, :]  # [B, N, C, C]
  o = _chunk_scores(q, k, b, (jnp.tril(jnp.ones((C, C), bool)) & same)[:, None]) @ vc
  # Segment of the token before each chunk (the first token's for chunk 0).
  seg_prev = jnp.concatenate([seg[:, :1, :1], seg[:, :-1, -1:]], axis=1)
  flag = lambda m: m[:, None, :, :, None]  # [B, N, *] -> [B, 1, N, *, 1]
  b_last = b[..., -1:, :]  # [B, H, N, 1, G]
  k_end = k * jnp.exp(b_last - b) * flag(seg == seg[:, :, -1:])
  carry = (jnp.exp(b_last) * flag(seg[:, :, -1:] == seg_prev))[..., 0, :, None]

  def step(s, inputs):  # s: state entering the chunk [B, H, K, V]
    carry_n, update_n = inputs
    return carry_n * s + update_n, s

  final, entering = jax.lax.scan(
      step, state, (jnp.moveaxis(carry, 2, 0), jnp.moveaxis(_t(k_end) @ vc, 2, 0)))
  o = o + (q * jnp.exp(b) * flag(seg == seg_prev)) @ jnp.moveaxis(entering, 0, 2)
  return chunks.merge(jnp.moveaxis(o, 1, 3), L).astype(v.dtype), final


def recurrent(q, k, v, log_decay, segment_ids, state, *, chunk_size):
  """The recurrence, one token per scan step."""
  del chunk_size  # an option of the chunked form
  q, k, v, g = map(_heads_first, (q, k, v, log_decay))
  prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
  carry = jnp.exp(g) * (segment_ids == prev)[:, None, :, None]  # [B, H, L, G]

  def step(s, inputs):
    q_t, k_t, v_t, carry_t = inputs  # [B, H, K], [B, H, K], [B, H, V], [B, H, G]
    s = carry_t[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
    return s, jnp.einsum("bhk,bhkv->bhv", q_t, s)

  time_major = lambda x: jnp.moveaxis(x, 2, 0)
  final, o = jax.lax.scan(step, state, tuple(map(time_major, (q, k, v, carry))))
  return _out(jnp.moveaxis(o, 0, 2), v), final


def _out(o_BxHxLxV, v_BxHxLxV):
  """Back to [B, L, H, V] in the caller's value dtype."""
  return jnp.swapaxes(o_BxHxLxV, 1, 2).astype(v_BxHxLxV.dtype)


# The pure-JAX forms: every platform runs them, and they are the oracles.
FORMS = ("chunked", "parallel", "recurrent")

LINEAR_ATTENTION = Op(
    "linear_attention",
    impls={"chunked": Impl("chunked", chunked),
           "parallel": Impl("parallel", parallel),
           "recurrent": Impl("recurrent", recurrent),
           "pallas_tpu": tpu_la.IMPL,
           "pallas_gpu": gpu_la.IMPL},
    order={"tpu": ("pallas_tpu", "chunked"),
           "gpu": ("pallas_gpu", "chunked"),
           "default": ("chunked",)},
)


# Jitted so that eager calls run as one program rather than op by op.
@functools.partial(jax.jit, static_argnames=("form", "chunk_size"))
def causal_linear_attention(q, k, v, *, log_decay=None, segment_ids=None,
                            state=None, form: str = "auto",
                            chunk_size: int = 64):
  """o_t = S_t^T q_t with S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T.

  Shapes as in the module docstring; log_decay None = no decay,
  segment_ids None = one segment, state None = zeros. Returns
  (o [B, L, H, V] in v's dtype, final state [B, H, K, V] fp32).
  """
  B, L, H, K = q.shape
  decay = ("none" if log_decay is None
           else "scalar" if log_decay.shape[-1] == 1 else "channel")
  impl = LINEAR_ATTENTION.choose(form, dtype=q.dtype, chunk_size=chunk_size,
                                 key_dim=K, value_dim=v.shape[-1], decay=decay)
  log_decay = (jnp.zeros((B, L, H, 1), jnp.float32) if log_decay is None
               else log_decay.astype(jnp.float32))
  segment_ids = (jnp.zeros((B, L), jnp.int32) if segment_ids is None
                 else segment_ids)
  state = (jnp.zeros((B, H, K, v.shape[-1]), jnp.float32) if state is None
           else state)
  return impl.fn(q, k, v, log_decay, segment_ids, state, chunk_size=chunk_size)


def normalized_linear_attention(q, k, v, *, eps: float = 1e-30, **kwargs):
  """o_t = sum_s w_ts v_s / max(sum_s w_ts, eps), w_ts = decayed q_t . k_s.

  For positive feature maps phi(q), phi(k). The value gets a channel of
  ones, so the denominator (the running sum of keys) rides in the same fp32
  state, of shape [B, H, K, V + 1]. The denominator is positive; `eps` only
  turns a fully underflowed 0/0 into 0, and is tiny so that it does not
  bias stabilized features whose sums are legitimately small (an additive
  1e-6 would). kwargs as `causal_linear_attention`.
  """
  ones = jnp.ones((*v.shape[:-1], 1), jnp.float32)
  o, state = causal_linear_attention(
      q, k, jnp.concatenate([v.astype(jnp.float32), ones], axis=-1), **kwargs)
  return (o[..., :-1] / jnp.maximum(o[..., -1:], eps)).astype(v.dtype), state


def flops_per_token(form: str, seq_len: int, chunk_size: int, key_dim: int,
                    value_dim: int) -> float:
  """Matmul FLOPs per token and head of `form` over a causal sequence.

  Recurrent: k v^T into the state and its read-out, 2 K V each. Parallel
  and chunked also score every query against a block of keys (the whole
  sequence, or its chunk) and mix their values: 2 T (K + V) for a block of
  T, masked entries included since they are computed. The Pallas kernels
  and "auto" (which chooses the chunked form or a kernel) count as chunked.
  """
  state = 4.0 * key_dim * value_dim
  chunk = min(chunk_size, seq_len)
  block = {"recurrent": 0, "chunked": chunk, "auto": chunk, "pallas_tpu": chunk,
           "pallas_gpu": chunk, "parallel": seq_len}[form]
  return state + 2.0 * block * (key_dim + value_dim)
