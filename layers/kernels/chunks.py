"""Splitting a sequence axis into fixed-size chunks: the one helper that
the chunked and blockwise kernels (flash attention, linear attention, the
selective scan, WKV) use.

`split(x, size)`: [B, L, ...] -> [B, n, size, ...], n = ceil(L / size),
the tail padded (zeros, or any `jnp.pad` mode such as "edge");
`merge(y, L)` is its inverse, dropping the padding. `scan_chunks` runs a
chunk function over the chunks with a carried state and pads nothing.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def split(x, size: int, **pad):
  """[B, L, ...] -> [B, ceil(L / size), size, ...]; `pad` as `jnp.pad`'s
  keywords (default zeros)."""
  if size < 1:
    raise ValueError(f"chunk size must be >= 1, got {size}")
  n = -(-x.shape[1] // size)
  x = jnp.pad(x, [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
              **pad)
  return x.reshape(x.shape[0], n, size, *x.shape[2:])


def merge(y, length: int):
  """[B, n, size, ...] -> [B, length, ...] (the first `length` positions)."""
  return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :length]


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
    n = n_full * chunk_size
    full = lambda x: jnp.swapaxes(split(x[:, :n], chunk_size), 0, 1)
    state, ys = jax.lax.scan(chunk_fn, state, jax.tree.map(full, xs))
    pieces.append(jax.tree.map(lambda y: merge(jnp.swapaxes(y, 0, 1), n), ys))
  if rest:
    state, ys = chunk_fn(state, jax.tree.map(lambda x: x[:, L - rest:], xs))
    pieces.append(ys)
  ys = jax.tree.map(lambda *p: jnp.concatenate(p, axis=1), *pieces)
  return state, ys
