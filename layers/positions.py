"""Position schemes for attention-like mixers.

A scheme acts in up to three places, and each is a no-op by default, so a
new scheme overrides only what it needs and mixers never branch on names:

  * `queries(q, pos)` / `keys(k, pos)`: transform q and k before the
    scores (RoPE rotates; xPos also scales). Keys are transformed before
    they enter a KV cache.
  * `bias(q_pos, k_pos)`: an additive score bias [B, H, Lq, Lk] (ALiBi),
    or None.

Shapes: q/k are [B, L, heads, head_dim]; pos are int32 [B, L] absolute
positions (within a segment, for packed rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.registry import Registry

REGISTRY: Registry["Position"] = Registry("position scheme", ("head_dim",))
register = REGISTRY.register
names = REGISTRY.names


def build(name: str, head_dim: int, **options) -> "Position":
  return REGISTRY.build(name, head_dim, **options)


class Position:
  """Identity scheme; subclasses override the hooks they need."""

  def __init__(self, head_dim: int, *, num_heads: int = 1):
    self.head_dim = head_dim
    self.num_heads = num_heads

  def queries(self, q: jax.Array, pos: jax.Array) -> jax.Array:
    return q

  def keys(self, k: jax.Array, pos: jax.Array) -> jax.Array:
    return k

  def bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array | None:
    return None


@register("none")
class NoPE(Position):
  """No positional information (NoPE; Kazemnejad et al., 2023). Causal
  masking alone lets a decoder infer order."""

  def __init__(self, head_dim: int, *, num_heads: int = 1):
    super().__init__(head_dim, num_heads=num_heads)


def rope_frequencies(head_dim: int, base: float) -> jax.Array:
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rotary(x: jax.Array, pos: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate pairs (x[..., :D/2], x[..., D/2:]) by angle pos * inv_freq.

  The half-split layout matches HuggingFace Llama, so converted checkpoints
  need no permutation. Angles are computed in fp32: bf16 positions above
  256 are not exact integers.
  """
  angles = pos.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


@register("rope")
class RoPE(Position):
  """Rotary position embedding (Su et al., 2021, RoFormer).

  q_m . k_n depends only on m - n: each pair of channels is rotated by
  m * base^(-2i/d).
  """

  def __init__(self, head_dim: int, *, num_heads: int = 1, base: float = 10000.0):
    super().__init__(head_dim, num_heads=num_heads)
    if head_dim % 2:
      raise ValueError(f"rope needs an even head_dim, got {head_dim}")
    self.base = base

  def inv_freq(self) -> jax.Array:
    return rope_frequencies(self.head_dim, self.base)

  def queries(self, q, pos):
    return apply_rotary(q, pos, self.inv_freq())

  def keys(self, k, pos):
    return apply_rotary(k, pos, self.inv_freq())


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Position of each token within its segment: [B, L] int32.

  Packed rows restart positions at every segment boundary, so a document
  sees the same positions packed as alone.
  """
  L = segment_ids.shape[1]
  idx = jnp.arange(L, dtype=jnp.int32)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool),
       segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


@register("xpos")
class XPos(RoPE):
  """xPos (Sun et al., 2022, "A Length-Extrapolatable Transformer",
  arXiv:2212.10554): RoPE plus a per-channel exponential scale, queries by
  zeta^(n / scale_base) and keys by zeta^(-m / scale_base), so that q_n . k_m
  gains the factor zeta^((n - m) / scale_base), a decay with distance.
  zeta_i = (2i / head_dim + gamma) / (1 + gamma) per rotated pair.

  scale_base=None keeps only the rotation: RetNet (Sun et al., 2023,
  arXiv:2307.08621) uses xPos's rotation and puts a per-head decay
  gamma^(n - m) in the retention itself in place of zeta, which keeps its
  recurrent state free of position-dependent scales.
  """

  def __init__(self, head_dim: int, *, num_heads: int = 1, base: float = 10000.0,
               scale_base: float | None = 512.0, gamma: float = 0.4):
    super().__init__(head_dim, num_heads=num_heads, base=base)
    if scale_base is not None and scale_base <= 0:
      raise ValueError(f"xpos scale_base must be > 0 or None, got {scale_base}")
    self.scale_base = scale_base
    self.gamma = gamma

  def scale(self, pos: jax.Array, sign: float) -> jax.Array:
    """zeta^(sign * pos / scale_base): [B, L, 1, head_dim] fp32, the same
    factor on both halves of each rotated pair."""
    i = jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim
    zeta = (i + self.gamma) / (1.0 + self.gamma)
    power = sign * pos.astype(jnp.float32)[..., None] / self.scale_base
    s = zeta ** power  # [B, L, D/2]
    return jnp.concatenate([s, s], axis=-1)[:, :, None, :]

  def scaled(self, x: jax.Array, pos: jax.Array, sign: float) -> jax.Array:
    if self.scale_base is None:
      return x
    return (x.astype(jnp.float32) * self.scale(pos, sign)).astype(x.dtype)

  def queries(self, q, pos):
    return self.scaled(super().queries(q, pos), pos, 1.0)

  def keys(self, k, pos):
    return self.scaled(super().keys(k, pos), pos, -1.0)
