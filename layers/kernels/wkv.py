"""RWKV "WKV" kernels: the weighted key-value sums of RWKV-4 and RWKV-6.

Both ops run entirely in fp32 (state, decays, exponentials) whatever the
input dtype and return fp32 outputs; the mixer casts back. Each has a
"recurrent" form (`lax.scan`, one token at a time; the decode form and the
reference) and a "chunked" form (a `lax.scan` over chunks of T tokens,
with the T x T pairs inside a chunk computed in parallel) that agree to
fp32 rounding.

WKV4 (RWKV-4, Peng et al. 2023, arXiv:2305.13048), per channel c, with
w = -exp(time_decay) < 0 the log decay per step and u the bonus:

  y_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
      / (sum_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t})

The state is (num, den, max): the two running sums scaled by e^{-max}, so
no exponential overflows however large k grows (the reference CUDA/CPU
kernels track the same maximum).

WKV6 (RWKV-6 "Finch", Peng et al. 2024, arXiv:2404.05892), per head, with a
matrix state S [K, V], data-dependent log decays logw_t [K] (< 0) and bonus
u [K]:

  y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),   S_t = diag(e^{logw_t}) S_{t-1} + k_t v_t^T

The chunked form takes cumulative log decays inside a chunk in fp32 and
only ever exponentiates differences that are <= 0, so it cannot overflow.

Every form takes `reset` [B, L] bool: True where a new sequence starts
(a segment of a packed row); the state seen there is empty, as if the
sequence were run alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from layers.kernels import Impl, Op
from layers.kernels.linear_recurrence import scan_chunks

# The "empty" running maximum: exp(NEG - anything finite) == 0, and unlike
# -inf it keeps max/subtract gradients finite.
NEG = -1e38
F32 = jnp.float32
# Tokens per chunk of the chunked forms: T^2 pairs per chunk are computed
# in parallel; larger T means more parallel work and more live memory.
CHUNK = 16


@struct.dataclass
class WKV4State:
  """num, den: running sums scaled by e^{-max}; max: their log scale. [B, C] fp32."""
  num: jax.Array
  den: jax.Array
  max: jax.Array

  @classmethod
  def zeros(cls, batch_size: int, channels: int) -> "WKV4State":
    z = jnp.zeros((batch_size, channels), F32)
    return cls(z, z, jnp.full((batch_size, channels), NEG, F32))


def segments(reset_BxT):
  """Segment index of every token of a chunk, counting resets from its
  start: 0 means "continues the state carried into the chunk"."""
  return jnp.cumsum(reset_BxT.astype(jnp.int32), axis=1)


def wkv4_recurrent(w_C, u_C, k_BxLxC, v_BxLxC, state: WKV4State, reset_BxL):
  """One token per step; the same max tracking as the reference kernels."""
  w, u = w_C.astype(F32), u_C.astype(F32)
  empty = WKV4State.zeros(*k_BxLxC.shape[::2])

  def step(s, kvr):
    k, v, reset = kvr
    s = jax.tree.map(lambda e, x: jnp.where(reset[:, None], e, x), empty, s)
    m_out = jax.lax.stop_gradient(jnp.maximum(s.max, u + k))
    e_state, e_self = jnp.exp(s.max - m_out), jnp.exp(u + k - m_out)
    y = (e_state * s.num + e_self * v) / (e_state * s.den + e_self)
    m_new = jax.lax.stop_gradient(jnp.maximum(s.max + w, k))
    e_state, e_new = jnp.exp(s.max + w - m_new), jnp.exp(k - m_new)
    return WKV4State(e_state * s.num + e_new * v, e_state * s.den + e_new, m_new), y

  kvr = (jnp.swapaxes(k_BxLxC, 0, 1).astype(F32),
         jnp.swapaxes(v_BxLxC, 0, 1).astype(F32), jnp.swapaxes(reset_BxL, 0, 1))
  state, y = jax.lax.scan(step, state, kvr)
  return jnp.swapaxes(y, 0, 1), state


def _wkv4_chunk(w, u, s: WKV4State, kv):
  """Outputs of one chunk of T tokens and the state after it.

  Every term is a log weight; each output row subtracts its own maximum
  before exponentiating. The maxima are constants of the result (they
  cancel), hence stop_gradient. Terms from another segment are NEG.
  """
  k, v, reset = kv  # [B, T, C] fp32, [B, T] bool
  T = k.shape[1]
  t = jnp.arange(T)
  seg = segments(reset)
  lag = (t[:, None] - 1 - t[None, :]).astype(F32)  # [T(out), T(in)]: t-1-i
  past = (lag >= 0)[None] & (seg[:, :, None] == seg[:, None, :])      # [B,T,T]
  s_pair = jnp.where(past[..., None], lag[None, :, :, None] * w + k[:, None],
                     NEG)                                             # [B,T,T,C]
  s_self = u + k                                                      # [B,T,C]
  s_state = jnp.where((seg == 0)[..., None],
                      s.max[:, None] + t[None, :, None].astype(F32) * w, NEG)
  m = jax.lax.stop_gradient(
      jnp.maximum(jnp.maximum(s_pair.max(2), s_self), s_state))
  p_pair = jnp.exp(s_pair - m[:, :, None])
  p_self, p_state = jnp.exp(s_self - m), jnp.exp(s_state - m)
  num = jnp.einsum("btic,bic->btc", p_pair, v) + p_self * v + p_state * s.num[:, None]
  den = p_pair.sum(2) + p_self + p_state * s.den[:, None]
  # State after the chunk: token i has decayed T-1-i steps, the old state T.
  last = (seg == seg[:, -1:])[..., None]  # tokens of the chunk's last segment
  s_end = jnp.where(last, (T - 1 - t)[None, :, None].astype(F32) * w + k, NEG)
  s_old = jnp.where(seg[:, -1:] == 0, s.max + T * w, NEG)
  m_new = jax.lax.stop_gradient(jnp.maximum(s_end.max(1), s_old))
  p_end, p_old = jnp.exp(s_end - m_new[:, None]), jnp.exp(s_old - m_new)
  new = WKV4State((p_end * v).sum(1) + p_old * s.num,
                  p_end.sum(1) + p_old * s.den, m_new)
  return new, num / den


def wkv4_chunked(w_C, u_C, k_BxLxC, v_BxLxC, state: WKV4State, reset_BxL, *,
                 chunk_size: int = CHUNK):
  """Chunks of `chunk_size` tokens: O(L T C) time, O(B T^2 C) live memory."""
  w, u = w_C.astype(F32), u_C.astype(F32)
  state, y = scan_chunks(lambda s, kv: _wkv4_chunk(w, u, s, kv), state,
                         (k_BxLxC.astype(F32), v_BxLxC.astype(F32), reset_BxL),
                         chunk_size)
  return y, state


# Forward FLOPs per channel per token (one per add, multiply or exp): the
# chunked form computes all T x T pairs of a chunk, ~5 operations each.
WKV4_FLOPS = {"chunked": 5 * CHUNK + 14, "recurrent": 12}

WKV4 = Op(
    "wkv4",
    impls={"chunked": Impl("chunked", wkv4_chunked),
           "recurrent": Impl("recurrent", wkv4_recurrent)},
    order={"default": ("chunked", "recurrent")},
)


def wkv6_recurrent(r_BxLxHxK, k_BxLxHxK, v_BxLxHxV, logw_BxLxHxK, u_HxK,
                   S_BxHxKxV, reset_BxL):
  """One token per step on the [K, V] state of every head."""
  u = u_HxK.astype(F32)

  def step(S, rkvw):
    r, k, v, logw, reset = rkvw  # [B, H, K|V], [B]
    S = jnp.where(reset[:, None, None, None], 0.0, S)
    kv = k[..., :, None] * v[..., None, :]
    y = jnp.einsum("bhk,bhkv->bhv", r, S + u[..., None] * kv)
    return jnp.exp(logw)[..., None] * S + kv, y

  seq = tuple(jnp.swapaxes(a, 0, 1).astype(F32)
              for a in (r_BxLxHxK, k_BxLxHxK, v_BxLxHxV, logw_BxLxHxK))
  seq += (jnp.swapaxes(reset_BxL, 0, 1),)
  S, y = jax.lax.scan(step, S_BxHxKxV.astype(F32), seq)
  return jnp.swapaxes(y, 0, 1), S


def _wkv6_chunk(u, S, rkvw):
  r, k, v, logw, reset = rkvw            # [B, T, H, K|V] fp32, [B, T] bool
  T = r.shape[1]
  seg = segments(reset)
  b = jnp.cumsum(logw, axis=1)           # log decay of tokens 0..t
  b_before = b - logw                    # ... of tokens 0..t-1
  t = jnp.arange(T)
  pairs = (t[None, :] < t[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
  # Decay from token i to the output at t > i: prod_{i<j<t} w_j (<= 1).
  decay = jnp.exp(jnp.where(pairs[..., None, None],
                            b_before[:, :, None] - b[:, None], -jnp.inf))
  A = jnp.einsum("bthk,bihk,btihk->bhti", r, k, decay)
  bonus = jnp.einsum("bthk,hk,bthk->bth", r, u, k)
  carried = (seg == 0)[..., None, None]  # outputs that still see S
  y = (jnp.einsum("bhti,bihv->bthv", A, v) + bonus[..., None] * v
       + jnp.einsum("bthk,bhkv->bthv", jnp.where(carried, r * jnp.exp(b_before), 0.0), S))
  # Decay from token i to the chunk end; only the last segment is kept.
  to_end = jnp.where((seg == seg[:, -1:])[..., None, None],
                     jnp.exp(b[:, -1:] - b), 0.0)
  keep = (seg[:, -1] == 0)[:, None, None, None]  # no reset in the chunk
  S = (jnp.where(keep, jnp.exp(b[:, -1])[..., None] * S, 0.0)
       + jnp.einsum("bihk,bihv->bhkv", k * to_end, v))
  return S, y


def wkv6_chunked(r_BxLxHxK, k_BxLxHxK, v_BxLxHxV, logw_BxLxHxK, u_HxK,
                 S_BxHxKxV, reset_BxL, *, chunk_size: int = CHUNK):
  """Chunks of `chunk_size` tokens: intra-chunk pairs as a masked T x T
  matrix per head (decays taken pairwise, O(B H T^2 K) live memory), the
  state carried across chunks."""
  u = u_HxK.astype(F32)
  seq = tuple(a.astype(F32) for a in (r_BxLxHxK, k_BxLxHxK, v_BxLxHxV,
                                      logw_BxLxHxK)) + (reset_BxL,)
  S, y = scan_chunks(lambda S, c: _wkv6_chunk(u, S, c), S_BxHxKxV.astype(F32),
                     seq, chunk_size)
  return y, S


def wkv6_flops(impl_name: str, head_dim: int) -> float:
  """Forward FLOPs per head per token with K = V = head_dim: the recurrent
  form updates and reads the K x V state (~7 K V); the chunked form builds
  the T x T decayed score matrix (~5 T K), applies it (2 T V), and reads and
  updates the carried state (~4 K V)."""
  K, T = head_dim, CHUNK
  return {"chunked": 7.0 * T * K + 4.0 * K * K, "recurrent": 7.0 * K * K}[impl_name]


WKV6 = Op(
    "wkv6",
    impls={"chunked": Impl("chunked", wkv6_chunked),
           "recurrent": Impl("recurrent", wkv6_recurrent)},
    order={"default": ("chunked", "recurrent")},
)
