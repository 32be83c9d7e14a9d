"""What the TPU and GPU linear-scan kernels share: padding, and the
backward pass as the reverse scan under one custom VJP.

The op is `layers.kernels.linear_recurrence`'s: h_t = a_t h_{t-1} + b_t
over a, b [B, L, C] from h0 [B, C], returning every h_t and the last, fp32.
A backend supplies `scan(static, a, b, h0, *, reverse)` on arrays padded to
its blocks ([B, Lp, Cp] fp32, `static` = (time block, channel block,
interpret)); reverse=True runs h_t = a_t h_{t+1} + b_t from the end, with
h0 entering after the last step.

Backward: with lambda_t = dLoss/db_t (the cotangent reaching h_t, its own
plus what flows back from h_{t+1}):
  lambda_t = g_t + a_{t+1} lambda_{t+1}   (the reverse scan of (a shifted, g))
  da_t = lambda_t h_{t-1},  db_t = lambda_t,  dh0 = a_0 lambda_0.
Padding: time with a = 1, b = 0 (the state passes through, so the last
state is the padded end's), channels with zeros.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _core(scan: Callable):

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def core(static, a, b, h0):
    return scan(static, a, b, h0, reverse=False)

  def fwd(static, a, b, h0):
    h, last = scan(static, a, b, h0, reverse=False)
    return (h, last), (a, h, h0)

  def bwd(static, res, cotangents):
    a, h, h0 = res
    g_h, g_last = cotangents
    g = g_h.at[:, -1].add(g_last)
    a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
    lam, _ = scan(static, a_next, g, jnp.zeros_like(h0), reverse=True)
    h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
    return lam * h_prev, lam, a[:, 0] * lam[:, 0]

  core.defvjp(fwd, bwd)
  return core


def make_linear_recurrence(scan: Callable, blocks: Callable):
  """The op's fn(a, b, h0, *, interpret=False) on `scan`; `blocks(L, C)`
  returns (time block, channel block) or raises a ValueError naming the
  shape the kernel cannot run."""
  core = _core(scan)

  def linear_recurrence(a_BxLxC, b_BxLxC, h0_BxC, *, interpret=False):
    B, L, C = a_BxLxC.shape
    if any(jnp.iscomplexobj(x) for x in (a_BxLxC, b_BxLxC, h0_BxC)):
      raise ValueError("linear recurrence kernel: a, b and h0 must be real "
                       "(this kernel does not scan complex coefficients)")
    if b_BxLxC.shape != (B, L, C) or h0_BxC.shape != (B, C):
      raise ValueError(f"linear recurrence: a {a_BxLxC.shape}, b "
                       f"{b_BxLxC.shape} and h0 {h0_BxC.shape} must be "
                       "[B, L, C], [B, L, C] and [B, C]")
    T, CB = blocks(L, C)
    Lp, Cp = -(-L // T) * T, -(-C // CB) * CB
    pad = lambda x, value: jnp.pad(x.astype(F32), [(0, 0), (0, Lp - L),
                                                   (0, Cp - C)],
                                   constant_values=value)
    h0 = jnp.pad(h0_BxC.astype(F32), [(0, 0), (0, Cp - C)])
    h, last = core((T, CB, interpret), pad(a_BxLxC, 1.0), pad(b_BxLxC, 0.0),
                   h0)
    return h[:, :L, :C], last[:, :C]

  return linear_recurrence


def declines_scan(query: dict, platform: str, who: str) -> str | None:
  if query.get("platform") != platform:
    return f"{who} runs on {platform}, not {query.get('platform')}"
  if "dtype" not in query:
    return "the caller did not state dtype"
  if not jnp.issubdtype(query["dtype"], jnp.floating):
    return f"dtype {jnp.dtype(query['dtype']).name} (the kernel scans real floats)"
  return None
