"""Sequence (context) parallelism: a full-sequence call split along its
length over the layout's "length" mesh axes (`layers.parallel`), device r
of n holding tokens [r L/n, (r+1) L/n) of every row it holds. Both forms
run under `shard_map` and give the one-device outputs (to fp32 rounding).

  ring attention (Liu et al., 2023, "Ring Attention with Blockwise
      Transformers", arXiv:2310.01889): each device keeps its queries and
      passes its keys and values (and key segment ids) to the next device
      with `ppermute`, n - 1 times. At step t device r holds the keys of
      shard s = r - t (mod n): t = 0 is the causal diagonal, s < r is seen
      whole (no mask, only the offset for ALiBi), s > r is in the future and
      skipped. Every partial result is the blockwise kernel's
      (`layers.kernels.flash.attention_lse`) output and log-sum-exp, merged
      exactly by their log-sum-exps. K/V memory per device: two shards.
  linear attention (and every mixer over the shared causal linear
      attention op): the state entering shard r is the states of shards < r
      passed forward, S_in(r) = D(r-1) S_in(r-1) + S(r-1), with S(j) the
      final state of shard j run from zero and D(j) its total decay (0 where
      a segment starts inside it). Each device runs its kernel from zero,
      all-gathers the n (S, D) pairs (n states of [B, H, K, V]), folds them,
      and runs its kernel again from its entering state: exact, at twice the
      local kernel's work.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from layers import parallel
from layers.kernels import flash
from layers.parallel import BATCH, LENGTH, Layout


def length_layout() -> Layout | None:
  """The current layout if it splits the length, else None."""
  layout = parallel.current()
  return layout if layout is not None and layout.size(LENGTH) > 1 else None


def _shard_map(layout: Layout, fn, in_specs, out_specs):
  return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs,
                       out_specs=out_specs, check_vma=False)


def _merge(o_a, lse_a, o_b, lse_b):
  """Two partial attentions over disjoint key sets -> one. lse_a is finite
  (it holds the diagonal block, where every query sees itself)."""
  lse = jnp.logaddexp(lse_a, lse_b)
  w_a, w_b = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
  return w_a * o_a + w_b * o_b, lse


def ring_attention(layout: Layout, q, k, v, *, q_segment_ids=None,
                   kv_segment_ids=None, alibi_slopes=None, softcap=None,
                   scale=None):
  """Causal attention of full sequences (attention_call semantics, no
  q_offset or window) split along the length (see module doc). Heads stay
  split over the layout's "heads" axes."""
  n = layout.size(LENGTH)
  perm = [(i, (i + 1) % n) for i in range(n)]
  axis = layout.axes(LENGTH)
  opts = dict(softcap=softcap, scale=scale)

  def local(q, k, v, q_seg, kv_seg, slopes):
    r = jax.lax.axis_index(axis)
    T = q.shape[1]
    segs = lambda kv_seg: ({} if q_seg is None else
                           dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg))
    o, lse = flash.attention_lse(q, k, v, alibi_slopes=slopes, **segs(kv_seg),
                                 **opts)
    o = o.astype(jnp.float32)
    kv = (k, v, kv_seg)
    for t in range(1, n):
      kv = jax.lax.ppermute(kv, axis, perm)
      s = (r - t) % n

      def seen(kv, s=s):  # shard s < r: every key is in the past
        o_t, lse_t = flash.attention_lse(
            q, kv[0], kv[1], causal=False, q_offset=(r - s) * T,
            alibi_slopes=slopes, **segs(kv[2]), **opts)
        return o_t.astype(jnp.float32), lse_t

      def future(kv):
        return jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -jnp.inf)

      o, lse = _merge(o, lse, *jax.lax.cond(s < r, seen, future, kv))
    return o.astype(q.dtype)

  q_spec = layout.spec(BATCH, LENGTH, "heads", None)
  seg_spec = layout.spec(BATCH, LENGTH)
  return _shard_map(layout, local,
                    (q_spec, q_spec, q_spec, seg_spec, seg_spec,
                     layout.spec("heads")), q_spec)(
      q, k, v, q_segment_ids, kv_segment_ids, alibi_slopes)


def linear_attention(layout: Layout, kernel: Callable, q, k, v, *, log_decay,
                     segment_ids, state):
  """`kernel(q, k, v, log_decay=, segment_ids=, state=) -> (o, final state)`
  (a form of `layers.kernels.linear_attention`, normalized or not) over
  full sequences split along the length (see module doc). Returns the
  one-device (o, final state)."""
  n = layout.size(LENGTH)
  axis = layout.axes(LENGTH)
  B, L, H = q.shape[:3]
  log_decay = (jnp.zeros((B, L, H, 1), jnp.float32) if log_decay is None
               else log_decay.astype(jnp.float32))
  segment_ids = (jnp.zeros((B, L), jnp.int32) if segment_ids is None
                 else segment_ids)

  def local(q, k, v, g, seg, state0):
    run = functools.partial(kernel, q, k, v, log_decay=g, segment_ids=seg)
    _, own = run(state=jnp.zeros_like(state0))
    unbroken = jnp.all(seg == seg[:, :1], axis=1)[:, None, None]  # [B, 1, 1]
    decay = (jnp.exp(g.sum(1)) * unbroken)[..., None]  # [B, H, 1|K, 1]
    own_n, decay_n, first_n, last_n = jax.lax.all_gather(
        (own, decay, seg[:, 0], seg[:, -1]), axis)
    entering = [state0]
    for j in range(1, n + 1):
      carried = decay_n[j - 1] * entering[-1] + own_n[j - 1]
      if j < n:  # a segment starting at shard j's first token drops it
        carried = carried * (first_n[j] == last_n[j - 1])[:, None, None, None]
      entering.append(carried)
    o, _ = run(state=jnp.stack(entering[:n])[jax.lax.axis_index(axis)])
    return o, entering[n]

  x_spec = layout.spec(BATCH, LENGTH, "heads", None)
  state_spec = layout.spec(BATCH, "heads", None, None)
  return _shard_map(layout, local,
                    (x_spec, x_spec, x_spec, x_spec, layout.spec(BATCH, LENGTH),
                     state_spec), (x_spec, state_spec))(
      q, k, v, log_decay, segment_ids, state)
