"""Position schemes for attention-like mixers.

A scheme acts in up to three places, and each is a no-op by default, so a
new scheme overrides only what it needs and mixers never branch on names:

  * `queries(q, pos)` / `keys(k, pos)`: transform q and k before the
    scores (RoPE rotates; xPos also scales). Keys are transformed before
    they enter a KV cache.
  * `bias(q_pos, k_pos)`: an additive score bias [B, H, Lq, Lk] (ALiBi),
    or None. Schemes whose bias depends only on the distance q_pos - k_pos
    define `distance_bias(dist)` instead, for a dist of any layout with
    heads on axis 1 (size 1 or H): block-sparse mixers pass their gathered
    blocks' distances.
  * `slopes()`: for a bias linear in distance, -slope_h * (q_pos - k_pos),
    the per-head slopes [H] (ALiBi), else None. Dense attention's kernels
    take only such a bias, computed per block.

Shapes: q/k are [B, L, heads, head_dim]; pos are int32 [B, L] absolute
positions (within a segment, for packed rows).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from layers.registry import Registry

# num_heads is supplied by the mixer, so it is not a user option.
REGISTRY: Registry["Position"] = Registry("position scheme", ("head_dim", "num_heads"))
register = REGISTRY.register
names = REGISTRY.names


def build(name: str, head_dim: int, **options) -> "Position":
  return REGISTRY.build(name, head_dim, **options)


class Position:
  """Identity scheme; subclasses override the hooks they need."""

  def __init__(self, head_dim: int, *, num_heads: int = 1):
    self.head_dim = head_dim
    self.num_heads = num_heads

  # A scheme is a static attribute of its mixer, part of the graph that
  # nnx.jit hashes: equal by value (type and options), so equal mixers
  # share one compiled program instead of one per instance.
  def __eq__(self, other) -> bool:
    return type(self) is type(other) and vars(self) == vars(other)

  def __hash__(self) -> int:
    return hash((type(self), tuple(sorted(vars(self).items()))))

  def queries(self, q: jax.Array, pos: jax.Array) -> jax.Array:
    return q

  def keys(self, k: jax.Array, pos: jax.Array) -> jax.Array:
    return k

  def bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array | None:
    if type(self).distance_bias is Position.distance_bias:
      return None  # no bias: skip building the distance grid
    dist = (q_pos[:, :, None] - k_pos[:, None, :])[:, None]  # [B, 1, Lq, Lk]
    return self.distance_bias(dist.astype(jnp.float32))

  def distance_bias(self, dist: jax.Array) -> jax.Array | None:
    """Score bias from query-minus-key distances [b, 1|H, ...], or None."""
    return None

  def slopes(self) -> jax.Array | None:
    """Per-head slopes [H] fp32 when the bias is -slope_h * distance."""
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

  fraction < 1 is partial RoPE (GPT-NeoX, Phi, Griffin/RecurrentGemma at
  0.5): only the first d = fraction * head_dim channels rotate, as
  half-split pairs over those d with frequencies base^(-2i/d); the other
  channels pass unchanged and carry position-free content (HF's
  partial_rotary_factor layout).
  """

  # Multiplies q and k after rotation (YaRN's attention temperature).
  mscale: float = 1.0

  def __init__(self, head_dim: int, *, num_heads: int = 1, base: float = 10000.0,
               fraction: float = 1.0):
    super().__init__(head_dim, num_heads=num_heads)
    rotary_dim = head_dim * fraction
    if not (0.0 < fraction <= 1.0 and rotary_dim == round(rotary_dim)
            and round(rotary_dim) % 2 == 0):
      raise ValueError(
          f"rope rotates head_dim * fraction = {head_dim} * {fraction} "
          "channels: fraction must be in (0, 1] and the product an even "
          "integer (an even head_dim at fraction 1)")
    self.base = base
    self.rotary_dim = round(rotary_dim)

  def inv_freq(self) -> jax.Array:
    return rope_frequencies(self.rotary_dim, self.base)

  def queries(self, q, pos):
    return self._rotate(q, pos)

  def keys(self, k, pos):
    return self._rotate(k, pos)

  def _rotate(self, x, pos):
    turned, passed = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
    y = apply_rotary(turned, pos, self.inv_freq())
    y = y if self.mscale == 1.0 else (y * self.mscale).astype(x.dtype)
    return jnp.concatenate([y, passed], axis=-1)


def _check_factor(factor: float):
  if not factor >= 1.0:
    raise ValueError(f"context extension factor must be >= 1, got {factor}")


class _ScaledRoPE(RoPE):
  """RoPE whose frequencies depend on a context-extension `factor`."""

  def __init__(self, head_dim: int, *, num_heads: int = 1, base: float = 10000.0,
               factor: float = 2.0):
    super().__init__(head_dim, num_heads=num_heads, base=base)
    _check_factor(factor)
    self.factor = factor


@register("rope_linear")
class RoPELinear(_ScaledRoPE):
  """RoPE with linear position interpolation (Chen et al., 2023, "Extending
  Context Window of Large Language Models via Positional Interpolation"):
  position m is rotated as m / factor, so a model trained at length L sees
  angles from its training range at factor * L."""

  def inv_freq(self):
    return rope_frequencies(self.head_dim, self.base) / self.factor


@register("rope_ntk")
class RoPENTK(_ScaledRoPE):
  """NTK-aware RoPE scaling (bloc97, 2023; analysed in YaRN, Peng et al.,
  2023): the base becomes base * factor^(d / (d - 2)), which stretches low
  frequencies by ~factor while leaving the highest one unchanged."""

  def inv_freq(self):
    d = self.head_dim
    return rope_frequencies(d, self.base * self.factor ** (d / (d - 2)))


@register("yarn")
class YaRN(RoPE):
  """YaRN (Peng et al., 2023, arXiv:2309.00071): per-frequency blend of
  interpolation (low frequencies, divided by factor) and extrapolation (high
  frequencies), with a linear ramp between the dimensions that rotate
  beta_fast and beta_slow times over the original context, plus attention
  temperature sqrt(1/t) = 0.1 ln(factor) + 1 applied to q and k. Matches
  HuggingFace's "yarn" rope type."""

  def __init__(self, head_dim: int, *, num_heads: int = 1, base: float = 10000.0,
               factor: float = 4.0, original_max_len: int = 2048,
               beta_fast: float = 32.0, beta_slow: float = 1.0):
    super().__init__(head_dim, num_heads=num_heads, base=base)
    _check_factor(factor)
    self.factor, self.original_max_len = factor, original_max_len
    self.beta_fast, self.beta_slow = beta_fast, beta_slow
    self.mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

  def _correction_dim(self, rotations: float) -> float:
    d = self.head_dim
    return d * math.log(self.original_max_len / (rotations * 2 * math.pi)) / (
        2 * math.log(self.base))

  def inv_freq(self):
    d = self.head_dim
    low = max(math.floor(self._correction_dim(self.beta_fast)), 0)
    high = min(math.ceil(self._correction_dim(self.beta_slow)), d - 1)
    high = high + 0.001 if low == high else high
    ramp = jnp.clip((jnp.arange(d // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolate = 1.0 - ramp  # 1 for high frequencies: keep them as trained
    freq = rope_frequencies(d, self.base)
    return freq / self.factor * (1 - extrapolate) + freq * extrapolate


@register("rope_llama3")
class RoPELlama3(RoPE):
  """Llama 3.1 RoPE scaling (Meta, 2024): wavelengths longer than
  original_max_len / low_freq_factor are interpolated by `factor`, those
  shorter than original_max_len / high_freq_factor are kept, and the band
  between is blended smoothly."""

  def __init__(self, head_dim: int, *, num_heads: int = 1, base: float = 500000.0,
               factor: float = 8.0, low_freq_factor: float = 1.0,
               high_freq_factor: float = 4.0, original_max_len: int = 8192):
    super().__init__(head_dim, num_heads=num_heads, base=base)
    _check_factor(factor)
    if not high_freq_factor > low_freq_factor:
      raise ValueError("rope_llama3 needs high_freq_factor > low_freq_factor")
    self.factor, self.original_max_len = factor, original_max_len
    self.low, self.high = low_freq_factor, high_freq_factor

  def inv_freq(self):
    freq = rope_frequencies(self.head_dim, self.base)
    wavelen = 2 * math.pi / freq
    smooth = (self.original_max_len / wavelen - self.low) / (self.high - self.low)
    blended = (1 - smooth) * freq / self.factor + smooth * freq
    out = jnp.where(wavelen > self.original_max_len / self.low, freq / self.factor, freq)
    medium = ((wavelen >= self.original_max_len / self.high)
              & (wavelen <= self.original_max_len / self.low))
    return jnp.where(medium, blended, out)


def alibi_slopes(num_heads: int) -> jax.Array:
  """Head slopes 2^(-8 i / n), with the paper's interleaving for n not a
  power of two."""
  def powers(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  closest = 2 ** math.floor(math.log2(num_heads))
  slopes = powers(closest)
  if closest < num_heads:
    slopes += powers(2 * closest)[0::2][:num_heads - closest]
  return jnp.asarray(slopes, jnp.float32)


@register("alibi")
class ALiBi(Position):
  """ALiBi (Press et al., 2022, "Train Short, Test Long"): no embedding; the
  score of query i for key j gets -m_h * (i - j), a per-head linear
  distance penalty that extrapolates to longer contexts."""

  def slopes(self):
    return alibi_slopes(self.num_heads)

  def distance_bias(self, dist):
    slopes = self.slopes()
    return -slopes.reshape((1, -1) + (1,) * (dist.ndim - 2)) * dist.astype(jnp.float32)


def segment_starts(segment_ids: jax.Array) -> jax.Array:
  """[B, L] bool: True at the first token of every segment of a packed row,
  the row's first token included (a segment starts wherever the id
  changes, and at position 0)."""
  return jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool),
       segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Position of each token within its segment: [B, L] int32.

  Packed rows restart positions at every segment boundary, so a document
  sees the same positions packed as alone.
  """
  idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  starts = segment_starts(segment_ids)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


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
