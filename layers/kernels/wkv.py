"""RWKV-4's "WKV" kernel: the normalized, decayed key-value sum.

(RWKV-6's WKV is the shared causal linear attention; see
`layers.mixers.rwkv.wkv6`.)

The op runs entirely in fp32 (state, decays, exponentials) whatever the
input dtype and returns fp32 outputs; the mixer casts back. It has a
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

Both forms take `reset` [B, L] bool: True where a new sequence starts
(a segment of a packed row); the state seen there is empty, as if the
sequence were run alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from layers.kernels import Impl, Op
from layers.kernels.chunks import scan_chunks

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
    # On CPU the steps run serially either way, and the chunked form does
    # ~T times the work; wide devices want the chunk-parallel form.
    order={"cpu": ("recurrent", "chunked"), "default": ("chunked", "recurrent")},
)
