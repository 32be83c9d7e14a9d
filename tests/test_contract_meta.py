"""The contract suite can fail: each deliberately broken mixer is caught by
the check aimed at its bug, while the honest mixer passes the same check."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.errors import TraceContextError

import mixer_contract as mc
from layers.blocks.attention import KVCache
from layers.blocks.sparse import Fixed
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


class SelfJitting(Attention):
  """Jits its own forward when the input is concrete (what the block-sparse
  mixers once did to run fast eagerly), holding non-parameter state."""

  def __init__(self, d_model, *, rngs):
    super().__init__(d_model, rngs=rngs)
    self.shift = Fixed(jnp.zeros((d_model,)))

  def __call__(self, x, *, cache=None, segment_ids=None):
    if cache is None and not isinstance(x, jax.core.Tracer):
      return _self_jitted(self, x, segment_ids)
    return super().__call__(x + self.shift[...], cache=cache, segment_ids=segment_ids)


@nnx.jit
def _self_jitted(mixer, x, segment_ids):
  return mixer(x, segment_ids=segment_ids)


def _on_host(x):
  return np.asarray(x)


class HostCallback(Attention):
  """Routes its input through a host callback that has no batching rule."""

  def __call__(self, x, *, cache=None, segment_ids=None):
    x = jax.pure_callback(_on_host, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    return super().__call__(x, cache=cache, segment_ids=segment_ids)


class ConcreteShortcut(Attention):
  """Takes a different (bf16-rounded) path when its input is concrete, so
  eager differs from jit, and a closed-over input from a rematted one."""

  def __call__(self, x, *, cache=None, segment_ids=None):
    y = super().__call__(x, cache=cache, segment_ids=segment_ids)
    if cache is None and not isinstance(x, jax.core.Tracer):
      return y.astype(jnp.bfloat16).astype(y.dtype)
    return y


class Options:
  """An options holder without value equality: compared by identity."""


class IdentityStatic(Attention):
  """Keeps a static attribute compared by identity, so two layers built
  alike have different graphdefs and cannot be stacked."""

  def __init__(self, d_model, *, rngs):
    super().__init__(d_model, rngs=rngs)
    self.options = Options()


CASES = [
    (LeaksFuture, "causal"),
    (DriftingCache, "incremental"),
    (DeadParameter, "gradients"),
    (ClaimsConstantState, "metadata"),
    (IgnoresSegments, "packed"),
    (WrongDtype, "bf16"),
    (NoOverflowCheck, "overflow"),
    (NumpyInit, "traced_init"),
    (SelfJitting, "gradients"),
    (HostCallback, "vmap"),
    (ConcreteShortcut, "jit"),
    (ConcreteShortcut, "remat"),
    (IdentityStatic, "scan"),
]
# What a transform raises when a mixer breaks under it (besides a failed
# assertion): the self-jitting mixer's state write-back, and vmap of a
# callback without a batching rule.
FAILURES = (AssertionError, jax.errors.TracerArrayConversionError,
            TraceContextError, NotImplementedError)


@pytest.mark.parametrize("cls,check", CASES, ids=[f"{c.__name__}-{k}" for c, k in CASES])
def test_check_catches_planted_bug(cls, check):
  make = lambda seed: cls(mc.D_MODEL, rngs=nnx.Rngs(seed))
  with pytest.raises(FAILURES):
    mc.CHECKS[check](make)


@pytest.mark.parametrize("check", sorted({c for _, c in CASES}))
def test_honest_mixer_passes_same_check(check):
  mc.CHECKS[check](lambda seed: Attention(mc.D_MODEL, rngs=nnx.Rngs(seed)))
