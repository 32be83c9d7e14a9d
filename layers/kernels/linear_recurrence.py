"""Diagonal linear recurrences h_t = a_t * h_{t-1} + b_t, and chunking.

`LINEAR_RECURRENCE` takes a, b [B, L, C] and h0 [B, C] and returns every
h_t [B, L, C] and the last state [B, C], all in fp32 (a product of many
decays in bf16 drifts within a few hundred steps):

  * "associative": `lax.associative_scan` over (a, b) pairs, O(log L)
    depth, O(L) work; the form for GPUs/TPUs.
  * "sequential": `lax.scan`, one step at a time; the CPU form, and the
    reference the other is checked against.

`scan_chunks` runs a chunk function over fixed-size chunks with a carried
state (the chunked RWKV-4 WKV uses it).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from layers.kernels import Impl, Op


def _combine(left, right):
  a_l, b_l = left
  a_r, b_r = right
  return a_l * a_r, a_r * b_l + b_r


def associative(a_BxLxC, b_BxLxC, h0_BxC):
  a = a_BxLxC.astype(jnp.float32)
  b = b_BxLxC.astype(jnp.float32)
  b = b.at[:, 0].add(a[:, 0] * h0_BxC.astype(jnp.float32))
  _, h = jax.lax.associative_scan(_combine, (a, b), axis=1)
  return h, h[:, -1]


def sequential(a_BxLxC, b_BxLxC, h0_BxC):
  def step(h, ab):
    a_t, b_t = ab
    h = a_t * h + b_t
    return h, h

  ab = (jnp.swapaxes(a_BxLxC, 0, 1).astype(jnp.float32),
        jnp.swapaxes(b_BxLxC, 0, 1).astype(jnp.float32))
  last, h = jax.lax.scan(step, h0_BxC.astype(jnp.float32), ab)
  return jnp.swapaxes(h, 0, 1), last


# Forward FLOPs per channel per token: a sequential step is one multiply-add;
# the associative scan's up and down sweeps do about twice its combines,
# each three operations.
RECURRENCE_FLOPS = {"associative": 6, "sequential": 2}

LINEAR_RECURRENCE = Op(
    "linear_recurrence",
    impls={"associative": Impl("associative", associative),
           "sequential": Impl("sequential", sequential)},
    # On CPU a plain scan beats the associative scan's extra work and depth
    # bookkeeping; wide devices want the O(log L)-depth form.
    order={"cpu": ("sequential", "associative"),
           "default": ("associative", "sequential")},
)


def scan_chunks(chunk_fn: Callable[[Any, Any], tuple[Any, Any]], state: Any,
                xs: Any, chunk_size: int) -> tuple[Any, Any]:
  """Apply `chunk_fn(state, xs_chunk) -> (state, ys_chunk)` over axis 1.

  `xs` is a pytree of [B, L, ...] arrays. Full chunks go through one
  `lax.scan`; a shorter last chunk runs once more with its own static
  shape, so nothing is padded and the final state is exact.
  Returns (final state, ys concatenated back to [B, L, ...]).
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  L = jax.tree.leaves(xs)[0].shape[1]
  n_full, rest = divmod(L, chunk_size)
  pieces = []
  if n_full:
    def split(x):  # [B, n*T, ...] -> [n, B, T, ...]
      x = x[:, :n_full * chunk_size]
      x = x.reshape(x.shape[0], n_full, chunk_size, *x.shape[2:])
      return jnp.swapaxes(x, 0, 1)

    def merge(y):  # [n, B, T, ...] -> [B, n*T, ...]
      y = jnp.swapaxes(y, 0, 1)
      return y.reshape(y.shape[0], n_full * chunk_size, *y.shape[3:])

    state, ys = jax.lax.scan(chunk_fn, state, jax.tree.map(split, xs))
    pieces.append(jax.tree.map(merge, ys))
  if rest:
    state, ys = chunk_fn(state, jax.tree.map(lambda x: x[:, L - rest:], xs))
    pieces.append(ys)
  ys = jax.tree.map(lambda *p: jnp.concatenate(p, axis=1), *pieces)
  return state, ys
