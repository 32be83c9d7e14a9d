"""The contract suite can fail: each deliberately broken mixer is caught by
the check aimed at its bug, while the honest mixer passes the same check."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixer_contract as mc
from layers.blocks.attention import KVCache
from layers.mixers.attention import Attention


class LeaksFuture(Attention):
  """Full-sequence form attends to every position (no causal mask)."""

  def __call__(self, x, *, cache=None, segment_ids=None):
    if cache is not None:
      return super().__call__(x, cache=cache)
    q, k, v = self.proj.q(x), self.proj.k(x), self.proj.v(x)
    return self.proj.o(self.attend(q, k, v, causal=False))


class DriftingCache(Attention):
  """Incremental form restarts positions at 0 for every piece."""

  def __call__(self, x, *, cache=None, segment_ids=None):
    if cache is None:
      return super().__call__(x, segment_ids=segment_ids)
    y, new = super().__call__(x, cache=cache)
    # Re-run with the position forgotten: RoPE angles no longer match.
    y2, _ = super().__call__(x, cache=KVCache(cache.k, cache.v, cache.pos * 0))
    return y2, new


class DeadParameter(Attention):
  """Holds a parameter that never reaches the output."""

  def __init__(self, d_model, *, rngs):
    super().__init__(d_model, rngs=rngs)
    self.unused = nnx.Param(jnp.ones((3,)), logical_axes=(None,))


class ClaimsConstantState(Attention):
  """Says its decode state is constant while holding a KV cache."""
  info = dataclasses.replace(Attention.info, decode_state="constant")


class IgnoresSegments(Attention):
  """Says it supports packing but lets segments see each other."""

  def __call__(self, x, *, cache=None, segment_ids=None):
    return super().__call__(x, cache=cache)


class WrongDtype(Attention):
  def __call__(self, x, *, cache=None, segment_ids=None):
    out = super().__call__(x, cache=cache, segment_ids=segment_ids)
    return out.astype(jnp.float32) if cache is None else out


class NoOverflowCheck(Attention):
  """Clamps writes past the cache instead of refusing them."""

  def __call__(self, x, *, cache=None, segment_ids=None):
    if cache is None:
      return super().__call__(x, segment_ids=segment_ids)
    pos = jnp.minimum(cache.pos, cache.max_len - x.shape[1])
    return super().__call__(x, cache=KVCache(cache.k, cache.v, pos))


class NumpyInit(Attention):
  """Pulls a random draw into numpy at init, which fails under jit."""

  def __init__(self, d_model, *, rngs):
    super().__init__(d_model, rngs=rngs)
    draw = np.asarray(jax.random.normal(rngs.params(), (3,)))
    self.extra = nnx.Param(jnp.asarray(draw), logical_axes=(None,))


CASES = [
    (LeaksFuture, "causal"),
    (DriftingCache, "incremental"),
    (DeadParameter, "gradients"),
    (ClaimsConstantState, "metadata"),
    (IgnoresSegments, "packed"),
    (WrongDtype, "bf16"),
    (NoOverflowCheck, "overflow"),
    (NumpyInit, "traced_init"),
]


@pytest.mark.parametrize("cls,check", CASES, ids=[c[0].__name__ for c in CASES])
def test_check_catches_planted_bug(cls, check):
  make = lambda seed: cls(mc.D_MODEL, rngs=nnx.Rngs(seed))
  with pytest.raises((AssertionError, jax.errors.TracerArrayConversionError)):
    mc.CHECKS[check](make)


@pytest.mark.parametrize("check", sorted({c for _, c in CASES}))
def test_honest_mixer_passes_same_check(check):
  mc.CHECKS[check](lambda seed: Attention(mc.D_MODEL, rngs=nnx.Rngs(seed)))
