"""Sparse attention mixers against dense oracles of their exact patterns.

Each oracle builds the pattern as a dense [heads, L, L] mask straight from
the paper's definition (a test may be quadratic) and runs plain softmax
attention with the mixer's own projections, in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import mixers
from layers.kernels import block_sparse
from layers.mixers.base import positions_for
from layers.mixers.bigbird import random_blocks

D = 32
LENGTH = 23  # not a multiple of any block below
CUTS = [10, 13]  # few lengths (each compiles); the contract covers 1-token steps


def build(name, **options):
  return mixers.build(name, D, rngs=nnx.Rngs(0), **options)


# Jitted: eagerly, the many small index and gather ops of a sparse pattern
# would each compile on first use.
call = nnx.jit(lambda m, x, **kw: m(x, **kw))


def inputs(length=LENGTH, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((2, length, D)),
                     jnp.float32)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def dense(q, k, v, mask, scale=None, bias=0.0):
  """Softmax attention over the keys of `mask` [H|1, L, S]; float64.
  Returns o [B, L, H, K] and the log-sum-exp [B, L, H]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  H, K = q.shape[2:]
  k = np.repeat(k, H // k.shape[2], axis=2)
  v = np.repeat(v, H // v.shape[2], axis=2)
  s = np.einsum("blhk,bshk->bhls", q, k) * (K ** -0.5 if scale is None else scale)
  s = np.where(mask, s + bias, -np.inf)
  top = s.max(-1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  p = np.exp(s - top)
  total = p.sum(-1, keepdims=True)
  o = np.einsum("bhls,bshk->blhk", p / np.where(total > 0, total, 1.0), v)
  with np.errstate(divide="ignore"):
    lse = np.log(total[..., 0]) + top[..., 0]
  return o, lse.transpose(0, 2, 1)


def union(parts):
  """Softmax over the (multi)set union of the parts' keys."""
  lse = np.stack([l for _, l in parts])
  total = np.logaddexp.reduce(lse, axis=0)
  w = np.exp(lse - np.where(np.isfinite(total), total, 0.0))
  return sum(wi[..., None] * o for wi, (o, _) in zip(w, parts))


def projected(m, x):
  """Raw q, RoPE'd q and k, v at positions 0..L-1."""
  q, k, v = m.proj.q(x), m.proj.k(x), m.proj.v(x)
  pos = positions_for(x)
  return q, m.position.queries(q, pos), m.position.keys(k, pos), v


def position_bias(m, q_pos=None, length=LENGTH):
  """The scheme's score bias [1, H, L, L] for queries at q_pos (default
  0..L-1) and keys at 0..L-1: ALiBi's distance penalty; 0 for RoPE."""
  k_pos = jnp.arange(length)[None]
  q_pos = k_pos if q_pos is None else q_pos
  b = m.position.bias(q_pos, k_pos)
  return 0.0 if b is None else np.asarray(b, np.float64)


def finish(m, o):
  return m.proj.o(jnp.asarray(o, jnp.float32))


def grid(length=LENGTH):
  t = np.arange(length)[:, None]
  return t, np.arange(length)[None, :]


def run_pieces(m, x, cuts):
  cache = m.init_cache(x.shape[0], x.shape[1], x.dtype)
  outs, start = [], 0
  for n in cuts:
    y, cache = call(m, x[:, start:start + n], cache=cache)
    outs.append(y)
    start += n
  return jnp.concatenate(outs, axis=1)


def check(m, x, oracle, pieces):
  """Full form vs oracle and, where `pieces`, the incremental form vs the
  full form. The contract suite runs the incremental checks (1-token steps
  included) at default options; here they run for the options whose step
  paths the defaults do not reach."""
  y = call(m, x)
  assert rel_err(y, oracle) <= 1e-5, f"full form vs oracle: {rel_err(y, oracle):.3g}"
  if not pieces:
    return
  y_inc = run_pieces(m, x, CUTS)
  assert rel_err(y_inc, y) <= 1e-5, f"pieces vs full: {rel_err(y_inc, y):.3g}"


@pytest.mark.parametrize("window,block_size,pieces,position", [
    (7, 3, True, "rope"), (1, 2, False, "rope"), (7, 3, True, "alibi")])
def test_sliding_window(window, block_size, pieces, position):
  m = build("sliding_window", window=window, block_size=block_size,
            num_kv_heads=2, position=position)
  x = inputs()
  _, q, k, v = projected(m, x)
  t, s = grid()
  o, _ = dense(q, k, v, (s <= t) & (t - s < window), bias=position_bias(m))
  check(m, x, finish(m, o), pieces)


def test_sliding_window_packed():
  m = build("sliding_window", window=4)
  x = inputs(12)
  seg = jnp.asarray([[0] * 7 + [1] * 5] * 2, jnp.int32)
  y = call(m, x, segment_ids=seg)
  ref = jnp.concatenate([call(m, x[:, :7]), call(m, x[:, 7:])], axis=1)
  assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_attention_sinks(position):
  window, sinks = 4, 3
  m = build("attention_sinks", window=window, sinks=sinks, block_size=3,
            position=position)
  x = inputs()
  q_raw, q, k, v = projected(m, x)
  t, s = grid()
  # StreamingLLM cache positions: a sink outside the window is seen from
  # the query's slot in the cache, min(t, sinks + window - 1).
  cache_pos = jnp.minimum(positions_for(x), sinks + window - 1)
  q_sink = m.position.queries(q_raw, cache_pos)
  win = dense(q, k, v, (s <= t) & (t - s < window), bias=position_bias(m))
  sink = dense(q_sink, k, v, (s < sinks) & (t - s >= window),
               bias=position_bias(m, cache_pos[:1]))
  check(m, x, finish(m, union([win, sink])), pieces=position == "alibi")


def strided_mask(pattern, l, c, length=LENGTH):
  t, s = grid(length)
  if pattern == "strided":
    return (s <= t) & ((t - s < l) | ((t - s) % l == 0))
  return (s <= t) & ((s // l == t // l) | ((s % l >= l - c) & (s // l < t // l)))


@pytest.mark.parametrize("pattern,stride,summary,pieces,position", [
    ("strided", 3, 1, True, "rope"), ("fixed", 4, 2, False, "rope"),
    ("strided", 1, 1, False, "rope"), ("strided", 3, 1, True, "alibi"),
    ("fixed", 4, 2, False, "alibi")])
def test_strided(pattern, stride, summary, pieces, position):
  m = build("strided", pattern=pattern, stride=stride, summary=summary,
            num_kv_heads=2, position=position)
  x = inputs()
  _, q, k, v = projected(m, x)
  o, _ = dense(q, k, v, strided_mask(pattern, stride, summary),
               bias=position_bias(m))
  check(m, x, finish(m, o), pieces)


# Jitted: one compile per shape rather than one per op of the draw.
draw_random_blocks = jax.jit(random_blocks, static_argnums=(4, 5))


def bigbird_oracle(m, x):
  """Dense softmax over each head's BigBird blocks, the random ones drawn
  per head by `random_blocks`."""
  b, w, g, r, H = (m.block, m.window, m.global_blocks, m.random_blocks,
                   m.num_heads)
  _, q, k, v = projected(m, x)
  nb = -(-x.shape[1] // b)
  qb = jnp.arange(nb)
  rand = np.asarray(draw_random_blocks(m.pattern_key[...], qb, g, qb - w, r, H))
  allowed = np.zeros((H, nb, nb), bool)
  for h in range(H):
    for i in range(nb):
      allowed[h, i, :g] = True
      allowed[h, i, max(i - w, 0):i + 1] = True
      allowed[h, i, rand[h, i][rand[h, i] >= 0]] = True
  assert (rand >= 0).sum() > 0, "no random block was exercised"
  t, s = grid(x.shape[1])
  o, _ = dense(q, k, v, (s <= t) & allowed[:, t // b, s // b],
               bias=position_bias(m, length=x.shape[1]))
  return finish(m, o)


BIGBIRD = {"block_size": 3, "window": 1, "global_blocks": 1, "random_blocks": 2}


@pytest.mark.parametrize("position,num_kv_heads", [("rope", None), ("alibi", 2)])
def test_bigbird(position, num_kv_heads):
  m = build("bigbird", position=position, num_kv_heads=num_kv_heads, **BIGBIRD)
  x = inputs()
  # the step's bias path, and per-head tables over grouped kv heads
  check(m, x, bigbird_oracle(m, x), pieces=position == "alibi")


def test_bigbird_heads_read_different_random_blocks():
  m = build("bigbird", **BIGBIRD)
  table = np.asarray(m.table(jnp.arange(8)))  # [H, Q, N]
  assert table.shape[0] == m.num_heads
  assert all((table[0] != table[h]).any() for h in range(1, m.num_heads)), (
      "some heads share their random blocks")


class SharedTableBigBird(mixers.REGISTRY.get("bigbird")):
  """Planted bug: head 0's random blocks used by every head."""

  def table(self, qb):
    t = super().table(qb)
    return jnp.broadcast_to(t[:1], t.shape)


def test_bigbird_oracle_catches_one_table_for_all_heads():
  m = SharedTableBigBird(D, rngs=nnx.Rngs(0), **BIGBIRD)
  x = inputs()
  with pytest.raises(AssertionError, match="oracle"):
    check(m, x, bigbird_oracle(m, x), pieces=False)


def test_random_blocks_are_distinct_in_range_seeded_and_per_head():
  qb = jnp.arange(40)
  lo, hi, r, H = 2, qb - 1, 3, 2
  draw = lambda seed, n=40: np.asarray(draw_random_blocks(
      jax.random.key_data(jax.random.key(seed)), qb[-n:], lo, hi[-n:], r, H))
  a, b = draw(0), draw(1)
  assert a.shape == (H, 40, r)
  for h in range(H):
    for i, row in enumerate(a[h]):
      got = row[row >= 0]
      assert len(got) == min(r, max(int(hi[i]) - lo, 0)), (h, i, row)
      assert len(set(got)) == len(got) and all(lo <= got) and all(got < hi[i])
  np.testing.assert_array_equal(a, draw(0))
  assert (a != b).any(), "the seed does not change the pattern"
  assert (a[0] != a[1]).any(), "the heads draw the same blocks"
  # A query block's draw depends on (key, head, block) only.
  np.testing.assert_array_equal(draw(0, n=10), a[:, 30:])


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_dilated(position):
  branches = ((4, 1), (6, 2), (12, 3))
  m = build("dilated", segment_lengths=tuple(w for w, _ in branches),
            dilation_rates=tuple(r for _, r in branches), num_kv_heads=2,
            position=position)
  x = inputs()
  _, q, k, v = projected(m, x)
  t, s = grid()
  parts = []
  for w, r in branches:
    shift = (np.arange(m.num_heads) % r)[:, None, None]
    kept = lambda p: (p % w) % r == shift
    parts.append(dense(q, k, v, (s <= t) & (s // w == t // w) & kept(t) & kept(s),
                       bias=position_bias(m)))
  check(m, x, finish(m, union(parts)), pieces=position == "alibi")


def test_lsh():
  c, nb, rounds = 3, 4, 2
  m = build("lsh", chunk=c, n_buckets=nb, n_hashes=rounds)
  x = inputs()
  x32 = m.qk(x)
  rot = np.einsum("blhk,rhkn->blrhn", np.asarray(x32, np.float64),
                  np.asarray(m.rotations[...], np.float64))
  bucket = np.concatenate([rot, -rot], -1).argmax(-1)  # [B, L, R, H]
  np.testing.assert_array_equal(
      bucket.reshape(2, LENGTH, -1), nnx.jit(lambda m, a: m.buckets(a))(m, x32))
  unit = x32 / jnp.linalg.norm(x32, axis=-1, keepdims=True)
  v = m.v(x)
  t, s = grid()
  parts = []
  for r in range(rounds):
    b = bucket[:, :, r].transpose(0, 2, 1)  # [B, H, L]
    same = b[..., :, None] == b[..., None, :]
    rank = np.cumsum(np.eye(nb, dtype=int)[b], axis=2)  # same-bucket counts
    rank = np.take_along_axis(rank, b[..., None], -1)[..., 0]
    mask = same & (s <= t) & (rank[..., :, None] - rank[..., None, :] < c)
    parts.append(dense(x32, unit, v, mask, scale=1.0,
                       bias=np.where(s == t, -1e5, 0.0)))
  o = union(parts)
  check(m, x, m.o(jnp.asarray(o, jnp.float32)), pieces=False)


def intermediates(jaxpr):
  """Every value a jaxpr computes, nested jaxprs (jit, vmap bodies) included."""
  for e in jaxpr.eqns:
    yield from e.outvars
    for p in e.params.values():
      for sub in p if isinstance(p, (list, tuple)) else (p,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from intermediates(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from intermediates(sub)


@pytest.mark.parametrize("name,options", [
    ("sliding_window", {"window": 8, "block_size": 8}),
    ("attention_sinks", {"window": 8, "sinks": 4, "block_size": 8}),
    ("bigbird", {"block_size": 8}),
    ("dilated", {"segment_lengths": (8, 32), "dilation_rates": (1, 4)}),
    ("lsh", {"chunk": 8, "n_buckets": 8}),
])
def test_memory_grows_linearly(name, options):
  """No L x L intermediate: doubling L at most doubles the largest array of
  the traced full form (a masked dense score matrix would quadruple)."""
  graph, state = nnx.split(build(name, **options))
  def largest(length):
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graph, s)(x))(
        state, jnp.zeros((1, length, D)))
    return max(np.prod(v.aval.shape) for v in intermediates(jaxpr.jaxpr))
  small, big = largest(512), largest(1024)
  assert big <= 2 * small and big < 1024 * 1024, (small, big)


def test_window_longer_than_input_gathers_only_its_blocks():
  """A paper-sized window (4096) on a short input is causal attention and
  gathers no more than the input's own key blocks: the largest traced
  array equals that of a window just covering the input (without the
  kernel's compaction it is 4096 / 8 = 512 times larger)."""
  graph, state = nnx.split(build("sliding_window", window=4096, block_size=8))
  x = inputs()
  def largest(window):
    g, s = nnx.split(build("sliding_window", window=window, block_size=8))
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(g, s)(x))(s, x)
    return max(np.prod(v.aval.shape) for v in intermediates(jaxpr.jaxpr))
  assert largest(4096) == largest(LENGTH + 1)
  m = nnx.merge(graph, state)
  _, q, k, v = projected(m, x)
  t, s = grid()
  o, _ = dense(q, k, v, s <= t)
  check(m, x, finish(m, o), pieces=False)


def test_kernel_empty_rows_are_zero_with_finite_grads():
  """A query that sees no key gives 0 and -inf lse without NaN gradients."""
  q = jnp.ones((1, 4, 2, 4))
  k = v = jnp.ones((1, 4, 1, 4))
  meta = {"pos": jnp.arange(4)[None, None]}
  @jax.jit
  def f(q):
    o, lse = block_sparse.gather(
        q, k, v, table_fn=lambda qb: qb[:, None], mask_fn=lambda a, b:
        b["pos"] < a["pos"], q_meta=meta, k_meta=meta, block_q=2, block_k=2)
    return block_sparse.merge([(o, lse), (o, lse)]), lse
  o, lse = f(q)
  assert np.all(np.asarray(o[:, 0]) == 0) and np.isneginf(np.asarray(lse[:, 0])).all()
  g = jax.grad(lambda q: f(q)[0].sum())(q)
  assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("name,options,match", [
    ("sliding_window", {"window": 0}, "window"),
    ("sliding_window", {"block_size": 0}, "block_size"),
    ("sliding_window", {"kernel": "splash"}, "kernel"),
    ("lsh", {"position": "alibi"}, "score bias"),
    ("attention_sinks", {"sinks": 0}, "sinks"),
    ("strided", {"pattern": "diagonal"}, "pattern"),
    ("strided", {"stride": 2, "summary": 3}, "summary"),
    ("bigbird", {"random_blocks": -1}, "random_blocks"),
    ("dilated", {"segment_lengths": (4, 8), "dilation_rates": (1,)}, "same length"),
    ("dilated", {"segment_lengths": (4, 6), "dilation_rates": (1, 4)}, "divide"),
    ("dilated", {"segment_lengths": (4, 8), "dilation_rates": (2, 4)}, "rate of 1"),
    ("lsh", {"n_buckets": 3}, "even"),
])
def test_bad_options(name, options, match):
  with pytest.raises(ValueError, match=match):
    build(name, **options)
