"""The sequence-mixer contract, as reusable checks.

Each check takes `make(seed) -> Mixer` and raises AssertionError when the
mixer breaks the contract. `test_mixer_contract.py` runs them over every
registered mixer; `test_contract_meta.py` runs them over deliberately
broken mixers to show that each check can fail.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.mixers.base import DECODE_STATES, TRAIN_COSTS, Mixer, MixerInfo

D_MODEL = 32
BATCH = 2
LENGTH = 16
RTOL = 1e-5  # relative error for fp32 equivalences

Make = Callable[[int], Mixer]


def inputs(seed: int, length: int = LENGTH, dtype=jnp.float32) -> jax.Array:
  x = np.random.default_rng(seed).standard_normal((BATCH, length, D_MODEL))
  return jnp.asarray(x, dtype)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# Mixers never jit themselves: callers (the trainer, these checks) do.
@nnx.jit
def step(mixer, x, cache):
  return mixer(x, cache=cache)


@nnx.jit
def full(mixer, x, segment_ids=None):
  return mixer(x, segment_ids=segment_ids)


def run_pieces(mixer: Mixer, x: jax.Array, cuts: list[int], max_len: int):
  """Feed x in pieces of the given lengths through one jitted step."""
  cache = mixer.init_cache(x.shape[0], max_len, x.dtype)
  outs, start = [], 0
  for n in cuts:
    y, cache = step(mixer, x[:, start:start + n], cache)
    assert y.shape == (x.shape[0], n, x.shape[2]), (
        f"piece output shape {y.shape} != {(x.shape[0], n, x.shape[2])}")
    outs.append(y)
    start += n
  return jnp.concatenate(outs, axis=1), cache


def check_shape_dtype_jit(make: Make):
  m = make(0)
  x = inputs(1)
  y = full(m, x)
  assert y.shape == x.shape, f"output shape {y.shape} != input shape {x.shape}"
  assert y.dtype == x.dtype, f"output dtype {y.dtype} != input dtype {x.dtype}"
  assert np.isfinite(np.asarray(y)).all(), "non-finite fp32 output"


def check_bf16(make: Make):
  m = make(0)
  x = inputs(1, dtype=jnp.bfloat16)
  y = full(m, x)
  assert y.dtype == jnp.bfloat16, f"bf16 input gave {y.dtype} output"
  assert np.isfinite(np.asarray(y, np.float32)).all(), "NaN/Inf in bf16 forward"
  y32 = full(m, x.astype(jnp.float32))
  # bf16 has ~3 significant digits; a mixer that is merely noisy stays
  # well inside 5%, one that drifts or overflows does not.
  assert rel_err(y, y32) < 0.05, f"bf16 vs fp32 rel err {rel_err(y, y32):.3g}"
  _, cache = run_pieces(m, x, [LENGTH // 2, LENGTH // 2], LENGTH)
  for leaf in jax.tree.leaves(cache):
    assert np.isfinite(np.asarray(leaf, np.float32)).all(), "non-finite bf16 cache"


def check_causal(make: Make, seeds=(0, 1), ts=(0, 5, LENGTH - 2)):
  for seed in seeds:
    m = make(seed)
    x = inputs(10 + seed)
    y = np.asarray(full(m, x))
    for t in ts:
      noise = inputs(100 + seed + t)
      x2 = x.at[:, t + 1:].set(noise[:, t + 1:] * 3.0)
      y2 = np.asarray(full(m, x2))
      err = rel_err(y2[:, :t + 1], y[:, :t + 1])
      assert err <= RTOL, (f"not causal: changing inputs after t={t} changed "
                           f"outputs at <= t (rel err {err:.3g}, seed {seed})")


# Piece lengths are kept to a few distinct values (1, 5, LENGTH): each
# (length, max_len) pair compiles once per process.
CUTS = ([LENGTH], [1] * LENGTH, [5, 1, 5, 5])


def check_incremental(make: Make, cuts=CUTS):
  m = make(0)
  x = inputs(2)
  y_full = full(m, x)
  for cut in cuts:
    assert sum(cut) == LENGTH
    for max_len in (LENGTH, 2 * LENGTH) if cut == CUTS[2] else (2 * LENGTH,):
      y, _ = run_pieces(m, x, cut, max_len)
      err = rel_err(y, y_full)
      assert err <= RTOL, (f"incremental != full for pieces {cut}, max_len "
                           f"{max_len}: rel err {err:.3g}")


def check_overflow(make: Make):
  m = make(0)
  x = inputs(3)
  _, cache = run_pieces(m, x, [5, 5, 5], LENGTH)  # 15 of 16 slots
  try:
    m(x[:, :3], cache=cache)
  except ValueError as e:
    assert "max_len" in str(e), f"overflow error does not name max_len: {e}"
    return
  # Only mixers whose state never fills may accept it.
  assert m.info.decode_state != "length", (
      "a cache that grows with length accepted a piece past max_len")


def check_packed(make: Make, split=6):
  m = make(0)
  x = inputs(4)
  seg = jnp.asarray([[0] * split + [1] * (LENGTH - split),
                     [3] * (LENGTH - split) + [4] * split], jnp.int32)
  if not m.info.supports_segments:
    try:
      full(m, x, seg)
    except ValueError as e:
      assert "segment" in str(e), f"refusal does not mention segments: {e}"
      return
    raise AssertionError("mixer says it does not support segments but accepted them")
  y = full(m, x, seg)
  for b, s in ((0, split), (1, LENGTH - split)):
    a0 = full(m, x[b:b + 1, :s])
    a1 = full(m, x[b:b + 1, s:])
    ref = jnp.concatenate([a0, a1], axis=1)[0]
    err = rel_err(y[b], ref)
    assert err <= RTOL, f"packed != separate (row {b}): rel err {err:.3g}"


def param_grads(mixer: Mixer, x: jax.Array, w: jax.Array):
  """Gradients of sum(mixer(x) * w) w.r.t. the parameters only, by jax.grad
  over the split-out nnx.Params (other state, such as a pattern's Fixed
  randomness, held as it is). x is closed over: a concrete array inside the
  trace, as in a notebook probing one layer. A module that jits itself when
  its input is concrete fails here (its inner jit writes state back across
  trace levels)."""
  graph, params, rest = nnx.split(mixer, nnx.Param, ...)
  loss = lambda p: jnp.sum(nnx.merge(graph, p, rest)(x) * w)
  return jax.jit(jax.grad(loss))(params)


def check_gradients(make: Make):
  grads = param_grads(make(0), inputs(5), inputs(6))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert flat, "mixer has no parameters"
  for path, g in flat:
    name = jax.tree_util.keystr(path)
    g = np.asarray(g)
    assert np.isfinite(g).all(), f"non-finite gradient for {name}"
    assert np.abs(g).max() > 0, f"zero gradient for parameter {name}"


def check_jit(make: Make):
  """nnx.jit gives the eager call's output: the mixer neither jits itself
  nor behaves differently when traced."""
  m = make(0)
  x = inputs(1)
  err = rel_err(full(m, x), m(x))
  assert err <= RTOL, f"nnx.jit != eager call: rel err {err:.3g}"


def check_vmap(make: Make):
  """jax.vmap over a leading axis of inputs [N, B, L, D] gives the N
  unbatched calls."""
  m = make(0)
  xs = jnp.stack([inputs(1), inputs(5)])
  graph, state = nnx.split(m)
  apply = lambda s, x: nnx.merge(graph, s)(x)
  ys = jax.jit(jax.vmap(apply, in_axes=(None, 0)))(state, xs)
  for i, x in enumerate(xs):
    err = rel_err(ys[i], full(m, x))
    assert err <= RTOL, f"vmap row {i} != unbatched call: rel err {err:.3g}"


def check_remat(make: Make):
  """nnx.remat around the call leaves the loss and the parameter gradients
  unchanged (one program computes both, to compile once)."""
  m = make(0)
  x, w = inputs(5), inputs(6)
  remat = nnx.remat(lambda mod, x: mod(x))
  plain = nnx.value_and_grad(lambda mod: jnp.sum(mod(x) * w))
  rematted = nnx.value_and_grad(lambda mod: jnp.sum(remat(mod, x) * w))
  (v0, g0), (v1, g1) = nnx.jit(lambda mod: (plain(mod), rematted(mod)))(m)
  err = rel_err(v1, v0)
  assert err <= RTOL, f"loss under nnx.remat differs: rel err {err:.3g}"
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g0)[0],
                          jax.tree.leaves(g1), strict=True):
    err = rel_err(b, a)
    assert err <= RTOL, (f"gradient of {jax.tree_util.keystr(path)} under "
                         f"nnx.remat differs: rel err {err:.3g}")


def check_scan(make: Make, depth: int = 2):
  """A stack of `depth` layers (seeds 0..depth-1) run by jax.lax.scan over
  their stacked state equals the Python loop over the layers. Layers built
  with the same options must share one static graph (nnx.split's graphdef)
  to be stacked at all, so a static attribute compared by identity fails."""
  layers = [make(seed) for seed in range(depth)]
  graphs, states = zip(*(nnx.split(m) for m in layers))
  graph = graphs[0]
  assert all(g == graph for g in graphs), (
      "layers built with equal options have different static graphs (an "
      "attribute compared by identity, or set from the seed?): they cannot "
      "be stacked for nnx.scan / jax.lax.scan")
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
  body = lambda h, s: (nnx.merge(graph, s)(h), None)
  x = inputs(7)
  scanned, _ = jax.jit(lambda s, x: jax.lax.scan(body, x, s))(stacked, x)
  looped = x
  for m in layers:  # `full` is compiled once for the shared graph
    looped = full(m, looped)
  err = rel_err(scanned, looped)
  assert err <= RTOL, f"scan over {depth} layers != python loop: rel err {err:.3g}"


def check_traced_init(make: Make):
  """The trainer builds models under jit (and eval_shape): construction must
  not pull traced values into numpy or Python."""
  shapes = jax.eval_shape(lambda: nnx.split(make(0))[1])
  built = jax.jit(lambda: nnx.split(make(0))[1])()
  for s, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(built), strict=True):
    assert s.shape == b.shape, f"traced init shape {b.shape} != {s.shape}"


def check_deterministic(make: Make):
  a, b = make(7), make(7)
  pa = jax.tree.leaves(nnx.state(a, nnx.Param))
  pb = jax.tree.leaves(nnx.state(b, nnx.Param))
  for u, v in zip(pa, pb, strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  x = inputs(8)
  np.testing.assert_array_equal(np.asarray(full(a, x)), np.asarray(full(b, x)))


def cache_size(m: Mixer, max_len: int) -> int:
  shapes = jax.eval_shape(lambda: m.init_cache(1, max_len, jnp.float32))
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def check_metadata(make: Make):
  m = make(0)
  info = m.info
  assert isinstance(info, MixerInfo), "info must be a MixerInfo"
  assert info.paper and info.family, "info must name the paper and family"
  assert info.train_cost in TRAIN_COSTS and info.decode_state in DECODE_STATES
  doc = type(m).__doc__ or ""
  assert len(doc.split()) >= 20, "docstring must name the paper, equation and cost"
  f1, f2 = m.flops_per_token(1024), m.flops_per_token(4096)
  assert 0 < f1 < float("inf") and f2 >= f1, "flops_per_token must be positive, non-decreasing"
  if info.train_cost == "quadratic":
    assert f2 > f1, "quadratic mixer's FLOPs per token must grow with length"
  small, big = cache_size(m, 1024), cache_size(m, 4096)
  if info.decode_state == "length":
    assert big > small, "decode_state='length' but the cache does not grow"
  else:
    assert big == small, (f"decode_state={info.decode_state!r} but the cache "
                          f"grows with max_len ({small} -> {big} values)")


CHECKS = {
    "shape_dtype_jit": check_shape_dtype_jit,
    "bf16": check_bf16,
    "causal": check_causal,
    "incremental": check_incremental,
    "overflow": check_overflow,
    "packed": check_packed,
    "gradients": check_gradients,
    "jit": check_jit,
    "vmap": check_vmap,
    "remat": check_remat,
    "scan": check_scan,
    "deterministic": check_deterministic,
    "traced_init": check_traced_init,
    "metadata": check_metadata,
}
