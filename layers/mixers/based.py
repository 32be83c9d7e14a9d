"""Based: Taylor-feature linear attention plus sliding-window attention."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.kernels.attention import ATTENTION
from layers.mixers import register
from layers.mixers.attention import QKVProjection, build_position, resolve_heads
from layers.mixers.base import MixerInfo
from layers.mixers.linear_attention import FeatureAttention


def taylor_features(x):
  """[..., F] -> [..., 1 + F + F^2] fp32 with phi(q).phi(k) = 1 + q.k/sqrt(F)
  + (q.k)^2 / (2F), the 2nd-order Taylor expansion of exp(q.k/sqrt(F))."""
  x = x.astype(jnp.float32)
  F = x.shape[-1]
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], F * F)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x * F ** -0.25,
                          outer / math.sqrt(2.0 * F)], axis=-1)


# Jitted so that eager calls run as one program rather than op by op.
@functools.partial(jax.jit, static_argnames=("window",))
def sliding_window_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window):
  """Softmax attention of each query to the keys with 0 <= q_pos - k_pos <
  window (k_pos >= 0) in its segment.

  q [B, L, H, D]; k, v [B, window + L, H, D]: the `window` keys before the
  piece, then the piece's own; positions and segment ids [B, L] / [B,
  window + L]. Queries go in blocks of T = min(window, L); a block can only
  see its `window + T` keys starting at its own offset, so the cost is
  O(L (window + T)), not O(L^2).
  """
  B, L, H, D = q.shape
  T = min(window, L)
  N = -(-L // T)
  pad = N * T - L
  # Padded queries repeat the last position, so no row is fully masked.
  edge = lambda a: jnp.pad(a, ((0, 0), (0, pad)), mode="edge")
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B * N, T, H, D)
  q_pos, q_seg = edge(q_pos).reshape(B, N, T), edge(q_seg).reshape(B, N, T)
  # Padded keys sit after every query position, so they are masked.
  k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k, v))
  k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max)
  k_seg = edge(k_seg)
  idx = jnp.arange(N)[:, None] * T + jnp.arange(window + T)  # [N, window + T]
  blocks = lambda a: a[:, idx].reshape(B * N, window + T, *a.shape[2:])
  dist = q_pos[..., :, None] - k_pos[:, idx][:, :, None, :]  # [B, N, T, W+T]
  mask = ((dist >= 0) & (dist < window) & (k_pos[:, idx] >= 0)[:, :, None, :]
          & (q_seg[..., :, None] == k_seg[:, idx][:, :, None, :]))
  impl = ATTENTION.choose("auto", dtype=q.dtype, head_dim=D)
  o = impl.fn(q, blocks(k), blocks(v), mask.reshape(B * N, 1, T, window + T))
  return o.reshape(B, N * T, H, D)[:, :L]


@struct.dataclass
class BasedState:
  """linear: [B, H, 1 + F + F^2, head_dim + 1] fp32 Taylor-feature sums;
  k, v: [B, window, H, head_dim] the last `window` keys (position-encoded)
  and values, oldest first: a bounded buffer, whatever the length."""
  linear: jax.Array
  k: jax.Array
  v: jax.Array


@register("based")
class Based(FeatureAttention):
  """Based (Arora et al., 2024, "Simple linear attention language models
  balance the recall-throughput tradeoff", arXiv:2402.18668).

  Sum of two branches. Linear attention with the 2nd-order Taylor feature
  map phi(x) = [1, x / F^(1/4), vec(x x^T) / sqrt(2F)] on small q, k
  projections (feature_dim F, e.g. 16), so phi(q).phi(k) = 1 + q.k/sqrt(F) +
  (q.k)^2 / (2F) ~ exp(q.k/sqrt(F)), normalized by the running sum of keys;
  plus exact softmax attention over a sliding window of the last `window`
  tokens (with `position`, RoPE by default), which recovers precise local
  recall.

  Cost: training O(L (C F^2 + window) d) time (chunk C); decode O(F^2 d +
  window d) per token with a bounded state: an fp32 state of num_heads *
  (1 + F + F^2) * (head_dim + 1) values and a window-long key/value buffer.

  Options: num_heads, head_dim; feature_dim (F); window; position of the
  window branch; form ("chunked", "parallel", "recurrent") and chunk_size
  of the linear branch.
  """

  info = MixerInfo(family="linear attention", paper="Arora et al. 2024, "
                   "arXiv:2402.18668", train_cost="linear",
                   decode_state="bounded", supports_segments=True)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_heads: int = 4,
               head_dim: int | None = None, feature_dim: int = 16,
               window: int = 64, position: str | dict = "rope",
               form: str = "chunked", chunk_size: int = 64):
    _, head_dim = resolve_heads(d_model, num_heads, None, head_dim)
    super().__init__(d_model, rngs=rngs, num_heads=num_heads,
                     key_dim=feature_dim, head_dim=head_dim, form=form,
                     chunk_size=chunk_size)
    if window < 1:
      raise ValueError(f"based: window must be >= 1, got {window}")
    self.feature_dim = 1 + feature_dim + feature_dim ** 2
    self.window = window
    self.local = QKVProjection(d_model, num_heads, num_heads, head_dim, rngs=rngs)
    self.position = build_position(position, head_dim, num_heads)

  def mix(self, x, pos, segment_ids, state):
    o, linear = self.attend(taylor_features(self.q(x)),
                            taylor_features(self.k(x)), self.v(x),
                            segment_ids, state.linear)
    q = self.position.queries(self.local.q(x), pos)
    k = jnp.concatenate([state.k.astype(x.dtype),
                         self.position.keys(self.local.k(x), pos)], axis=1)
    v = jnp.concatenate([state.v.astype(x.dtype), self.local.v(x)], axis=1)
    # The buffer holds positions pos_0 - window .. pos_0 - 1 (< 0: empty).
    k_pos = jnp.concatenate(
        [pos[:, :1] - self.window + jnp.arange(self.window), pos], axis=1)
    seg = jnp.zeros_like(pos) if segment_ids is None else segment_ids
    k_seg = jnp.concatenate(
        [jnp.broadcast_to(seg[:, :1], (seg.shape[0], self.window)), seg], axis=1)
    local = sliding_window_attention(q, k, v, pos, k_pos, seg, k_seg, self.window)
    y = self.o(o) + self.local.o(local)
    buffer = lambda a: a[:, -self.window:].astype(state.k.dtype)
    return y, BasedState(linear, buffer(k), buffer(v))

  def zero_state(self, batch_size, dtype):
    shape = (batch_size, self.window, self.num_heads, self.head_dim)
    return BasedState(super().zero_state(batch_size, dtype),
                      jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def flops_per_token(self, seq_len):
    block = min(self.window, seq_len)
    local = 4.0 * self.num_heads * self.head_dim * (self.window + block)
    return (super().flops_per_token(seq_len) + self.local.flops_per_token()
            + local)
