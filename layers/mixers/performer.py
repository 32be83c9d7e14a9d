"""Performer: FAVOR+ linear attention with positive orthogonal random features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.blocks.attention import resolve_heads
from layers.blocks.linear import FeatureAttention
from layers.mixers import register
from layers.mixers.base import MixerInfo


class RandomFeatures(nnx.Variable):
  """A fixed random projection: not an nnx.Param, so optimizers and
  gradient filters leave it alone."""


def orthogonal_features(key: jax.Array, num: int, dim: int) -> jax.Array:
  """[num, dim] Gaussian rows, exactly orthogonal within blocks of `dim`
  (orthogonal random features), with chi-distributed norms like i.i.d.
  Gaussian rows so the softmax-kernel estimate stays unbiased."""
  blocks = -(-num // dim)
  k_dir, k_norm = jax.random.split(key)
  q_BxDxD, _ = jnp.linalg.qr(jax.random.normal(k_dir, (blocks, dim, dim)))
  rows = jnp.swapaxes(q_BxDxD, 1, 2).reshape(blocks * dim, dim)[:num]
  norms = jnp.linalg.norm(jax.random.normal(k_norm, (num, dim)), axis=-1)
  return rows * norms[:, None]


@jax.jit  # an eager associative scan dispatches hundreds of small ops
def segmented_cummax(x_BxLxH, starts_BxL, init_BxH):
  """Running max along L of x, restarting where `starts` is True and
  otherwise continuing from `init`."""
  def combine(a, b):
    (start_a, max_a), (start_b, max_b) = a, b
    return start_a | start_b, jnp.where(start_b, max_b, jnp.maximum(max_a, max_b))

  starts = jnp.concatenate([jnp.zeros_like(starts_BxL[:, :1]), starts_BxL], 1)
  values = jnp.concatenate([init_BxH[:, None], x_BxLxH], 1)
  _, run = jax.lax.associative_scan(
      combine, (starts[:, :, None], values), axis=1)
  return run[:, 1:]


@struct.dataclass
class PerformerState:
  """linear: [B, H, num_features, head_dim + 1] fp32 sums of phi(k) v^T and
  phi(k), relative to exp(key_max); key_max: [B, H] fp32 running max of key
  exponents since the sequence start (the key stabilizer)."""
  linear: jax.Array
  key_max: jax.Array


@register("performer")
class Performer(FeatureAttention):
  """Performer (Choromanski et al., 2020, "Rethinking Attention with
  Performers", arXiv:2009.14794), causal FAVOR+.

  exp(q.k / sqrt(K)) ~ phi(q).phi(k) with positive random features
  phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m), x' = x / K^(1/4), and W [m, K]
  orthogonal Gaussian rows drawn once at init (a non-trainable
  `RandomFeatures` variable). Causal by prefix sums: o_t = phi(q_t)^T S_t /
  phi(q_t)^T z_t, S_t = sum_{s<=t} phi(k_s) v_s^T, z_t = sum_{s<=t} phi(k_s).

  Stabilizers, both cancelling exactly in the normalization and neither
  looking ahead: each query subtracts its own max exponent; keys subtract
  M_t, the running max of key exponents up to t, and the state is rescaled
  by exp(M_{t-1} - M_t) when it grows (a per-step decay of the shared
  kernel). Every feature is then <= 1.

  Cost: training O(L C m d) time with the chunked form (chunk C); decode
  O(1) per token with a constant fp32 state of num_heads * m * (head_dim +
  1) values.

  Options: num_heads, head_dim, num_features (m, default the paper's 256);
  kernel ("auto", "chunked", "parallel", "recurrent", or a Pallas kernel on TPU/GPU); chunk_size.
  """

  info = MixerInfo(family="linear attention", paper="Choromanski et al. "
                   "2020, arXiv:2009.14794", train_cost="linear",
                   decode_state="constant", supports_segments=True)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_heads: int = 4,
               head_dim: int | None = None, num_features: int = 256,
               kernel: str = "auto", chunk_size: int = 64):
    _, head_dim = resolve_heads(d_model, num_heads, None, head_dim)
    super().__init__(d_model, rngs=rngs, num_heads=num_heads, key_dim=head_dim,
                     head_dim=head_dim, kernel=kernel, chunk_size=chunk_size)
    if num_features < 1:
      raise ValueError(f"performer: num_features must be >= 1, got {num_features}")
    self.feature_dim = num_features
    self.features = RandomFeatures(
        orthogonal_features(rngs.params(), num_features, head_dim))

  def exponents(self, x_BxLxHxK):
    """W x' and |x'|^2 / 2 in fp32."""
    x = x_BxLxHxK.astype(jnp.float32) * self.head_dim ** -0.25
    return (jnp.einsum("blhk,mk->blhm", x, self.features[...]),
            0.5 * jnp.sum(x * x, -1, keepdims=True))

  def mix(self, x, pos, segment_ids, state):
    wq, _ = self.exponents(self.q(x))  # |q'|^2/2 is per query: it cancels
    fq = jnp.exp(wq - jax.lax.stop_gradient(wq.max(-1, keepdims=True)))
    wk, sq = self.exponents(self.k(x))
    ek = wk - sq
    # Positions restart at 0 where a sequence or segment starts.
    starts = pos == 0
    key_max = jax.lax.stop_gradient(
        segmented_cummax(ek.max(-1), starts, state.key_max))  # [B, L, H]
    before = jnp.concatenate([state.key_max[:, None], key_max[:, :-1]], 1)
    log_decay = jnp.where(starts[..., None], 0.0, before - key_max)[..., None]
    fk = jnp.exp(ek - key_max[..., None])
    o, linear = self.attend(fq, fk, self.v(x), segment_ids, state.linear,
                            log_decay)
    return self.o(o), PerformerState(linear, key_max[:, -1])

  def zero_state(self, batch_size, dtype):
    # key_max is never read at a start (pos 0), so zeros is a safe filler.
    return PerformerState(super().zero_state(batch_size, dtype),
                          jnp.zeros((batch_size, self.num_heads), jnp.float32))

  def flops_per_token(self, seq_len):
    features = 2 * 2.0 * self.num_heads * self.feature_dim * self.head_dim
    return super().flops_per_token(seq_len) + features
