"""Linear / kernelized / decayed mixers: every form against the others and
against a direct O(L^2) reading of each paper's equation (numpy, float64)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import mixers, positions
from layers.kernels.linear_attention import FORMS, causal_linear_attention
from layers.mixers.based import taylor_features
from layers.mixers.performer import RandomFeatures
from layers.registry import OptionError
from mixer_contract import full, rel_err

B, H, K, V = 2, 2, 4, 3
RTOL = 1e-5


def f64(a):
  return np.asarray(a, np.float64)


def rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


# -- the shared kernel ------------------------------------------------------

def naive_recurrence(q, k, v, g, seg, s0):
  """o_t = sum_{s<=t, same segment} (q_t * prod_{r=s+1..t} a_r) . k_s v_s
  + [seg_t = seg_0] (q_t * prod_{r<=t} a_r) S0, a = exp(g), and the state
  after the last token, written out term by term."""
  q, k, v, s0, seg = map(f64, (q, k, v, s0, seg))
  a = np.broadcast_to(np.exp(f64(g)), q.shape)
  L = q.shape[1]
  o = np.zeros(v.shape)
  end = np.zeros(s0.shape)
  for b in range(q.shape[0]):
    for t in range(L):
      for s in range(t + 1):
        if seg[b, s] == seg[b, t]:
          w = (q[b, t] * np.prod(a[b, s + 1:t + 1], 0) * k[b, s]).sum(-1)
          o[b, t] += w[:, None] * v[b, s]
      if seg[b, t] == seg[b, 0]:
        o[b, t] += np.einsum("hk,hkv->hv", q[b, t] * np.prod(a[b, :t + 1], 0), s0[b])
    for s in range(L):
      if seg[b, s] == seg[b, -1]:
        end[b] += np.einsum("hk,hv->hkv", k[b, s] * np.prod(a[b, s + 1:], 0), v[b, s])
    if seg[b, -1] == seg[b, 0]:
      end[b] += np.prod(a[b], 0)[..., None] * s0[b]
  return o, end


def decay(rng, kind, L):
  if kind == "none":
    return None
  if kind == "head":
    return jnp.asarray(-rng.uniform(0, 0.5, (B, L, H, 1)), jnp.float32)
  # Per channel, half of them so strong (cumulative log decay ~ -100 over a
  # sub-chunk of 16) that splitting exp(b_t - b_s) as exp(b_t) exp(-b_s)
  # around the chunk start would overflow fp32.
  strong = -rng.uniform(4, 8, (B, L, H, K // 2))
  weak = -rng.uniform(0, 0.1, (B, L, H, K - K // 2))
  return jnp.asarray(np.concatenate([strong, weak], -1), jnp.float32)


# chunk 5 pads 40 -> 40 in 8 chunks; chunk 32 pads to 64 and splits each
# chunk into two sub-chunks of 16 for per-channel decay.
RUNS = [("parallel", 64), ("recurrent", 64), ("chunked", 5), ("chunked", 32)]


@pytest.mark.parametrize("kind", ["none", "head", "channel"])
def test_kernel_forms_match_recurrence(kind):
  rng = np.random.default_rng({"none": 0, "head": 1, "channel": 2}[kind])
  L = 40
  q, k = rand(rng, B, L, H, K), rand(rng, B, L, H, K)
  v, s0 = rand(rng, B, L, H, V), rand(rng, B, H, K, V)
  g = decay(rng, kind, L)
  seg = jnp.asarray([[0] * 7 + [1] * 20 + [2] * 13, [5] * L], jnp.int32)
  want_o, want_s = naive_recurrence(q, k, v, 0.0 if g is None else g, seg, s0)
  for form, chunk in RUNS:
    o, s = causal_linear_attention(q, k, v, log_decay=g, segment_ids=seg,
                                   state=s0, form=form, chunk_size=chunk)
    assert rel_err(o, want_o) <= RTOL, (form, chunk, rel_err(o, want_o))
    assert rel_err(s, want_s) <= RTOL, (form, chunk, rel_err(s, want_s))
    assert s.dtype == jnp.float32


# -- the mixers against their papers' equations ------------------------------

L_MIX = 13
# Small options so the equations bind at tiny shapes: a window shorter than
# the sequence, chunks that do not divide it.
OPTIONS = {"performer": {"num_features": 16}, "based": {"feature_dim": 3}}


def causal(L):
  return np.tril(np.ones((L, L), bool))


def normalized(w_BxHxLxL, v_BxLxHxV):
  """sum_s w_ts v_s / sum_s w_ts -> [B, L, H, V] fp32."""
  o = np.einsum("bhts,bshv->bthv", w_BxHxLxL, f64(v_BxLxHxV))
  return jnp.asarray(o / w_BxHxLxL.sum(-1).transpose(0, 2, 1)[..., None], jnp.float32)


def scores(q, k):
  return np.einsum("bthk,bshk->bhts", f64(q), f64(k))


def naive_linear_attention(m, x):
  elu1 = lambda z: np.where(f64(z) > 0, f64(z) + 1, np.exp(f64(z)))
  w = scores(elu1(m.q(x)), elu1(m.k(x))) * causal(x.shape[1])
  return m.o(normalized(w, m.v(x)))


def performer_exponents(m, z, dtype=np.float64):
  """W z' - |z'|^2 / 2 with z' = z / head_dim^(1/4): [B, L, H, m]."""
  z = np.asarray(z, dtype) * dtype(m.head_dim ** -0.25)
  w = np.asarray(m.features[...], dtype)
  return z @ w.T - dtype(0.5) * (z * z).sum(-1, keepdims=True)


def naive_performer(m, x, dtype=np.float64):
  phi = lambda z: np.exp(performer_exponents(m, z, dtype))
  w = scores(phi(m.q(x)), phi(m.k(x))) * causal(x.shape[1])
  return m.o(normalized(w, m.v(x)))


def naive_retnet(m, x):
  L = x.shape[1]
  pos = jnp.broadcast_to(jnp.arange(L), x.shape[:2])
  q, k = m.position.queries(m.q(x), pos), m.position.keys(m.k(x), pos)
  gamma = 1 - 2.0 ** (-5 - np.arange(m.num_heads))
  n = np.arange(L)
  D = np.where(causal(L), gamma[:, None, None] ** (n[:, None] - n[None, :]), 0.0)
  w = scores(q, k) / np.sqrt(m.head_dim) * D
  o = np.einsum("bhts,bshv->bthv", w, f64(m.v(x)))
  return m.o(m.out_gate(x, jnp.asarray(o, jnp.float32)))


def naive_gla(m, x):
  gate = f64(m.gate_up(m.gate_down(x)))
  alpha = (1 / (1 + np.exp(-gate))) ** (1 / m.temperature)  # [B, L, H, K]
  q, k, v = f64(m.q(x)) * m.key_dim ** -0.5, f64(m.k(x)), f64(m.v(x))
  L = x.shape[1]
  o = np.zeros(v.shape)
  for t in range(L):
    for s in range(t + 1):
      w = (q[:, t] * np.prod(alpha[:, s + 1:t + 1], 1) * k[:, s]).sum(-1)
      o[:, t] += w[..., None] * v[:, s]
  return m.o(m.out_gate(x, jnp.asarray(o, jnp.float32)))


def naive_based(m, x):
  """Softmax-free attention with weights 1 + q.k/sqrt(F) + (q.k)^2/(2F)."""
  L, F = x.shape[1], m.key_dim
  s = scores(m.q(x), m.k(x))
  return m.o(normalized((1 + s / np.sqrt(F) + s * s / (2 * F)) * causal(L),
                        m.v(x)))


NAIVE = {"linear_attention": naive_linear_attention,
         "performer": naive_performer, "retnet": naive_retnet,
         "gla": naive_gla, "based": naive_based}


@pytest.mark.parametrize("name", list(NAIVE))
def test_mixer_forms_agree_and_match_equation(name):
  x = jnp.asarray(np.random.default_rng(3).standard_normal((B, L_MIX, 32)),
                  jnp.float32)
  ys = {}
  for form in FORMS:
    m = mixers.build(name, 32, rngs=nnx.Rngs(0), kernel=form, chunk_size=5,
                     **OPTIONS.get(name, {}))
    ys[form] = full(m, x)
  want = NAIVE[name](m, x)
  for form, y in ys.items():
    assert rel_err(y, want) <= RTOL, (form, rel_err(y, want))
    assert rel_err(y, ys["chunked"]) <= RTOL, (form, rel_err(y, ys["chunked"]))


class MisscaledBased(mixers.REGISTRY.get("based")):
  """Planted bug: the square term of phi weighs (q.k)^2 / F, not / (2F)."""

  def mix(self, x, pos, segment_ids, state):
    F = self.key_dim
    phi = lambda z: taylor_features(z).at[..., 1 + F:].multiply(np.sqrt(2.0))
    o, state = self.attend(phi(self.q(x)), phi(self.k(x)), self.v(x),
                           segment_ids, state)
    return self.o(o), state


def test_based_equation_check_catches_a_misscaled_feature_map():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((B, L_MIX, 32)),
                  jnp.float32)
  m = MisscaledBased(32, rngs=nnx.Rngs(0), **OPTIONS["based"])
  assert rel_err(full(m, x), naive_based(m, x)) > 100 * RTOL


def test_chunk_size_does_not_change_outputs():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((B, L_MIX, 32)),
                  jnp.float32)
  ys = [full(mixers.build("gla", 32, rngs=nnx.Rngs(0), chunk_size=c), x)
        for c in (1, 4, 64)]
  assert rel_err(ys[0], ys[2]) <= RTOL and rel_err(ys[1], ys[2]) <= RTOL


# -- performer ---------------------------------------------------------------

def test_performer_features_are_fixed_orthogonal_and_not_trained():
  m = mixers.build("performer", 32, rngs=nnx.Rngs(0), num_features=12)
  assert "features" not in nnx.state(m, nnx.Param)
  assert "features" in nnx.state(m, RandomFeatures)
  w = np.asarray(m.features[...])
  assert w.shape == (12, 8)
  for block in (w[:8], w[8:]):
    gram = block @ block.T
    np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-4)


def test_performer_is_exact_where_unstabilized_favor_underflows():
  x = jnp.asarray(np.random.default_rng(5).standard_normal((B, L_MIX, 32)),
                  jnp.float32) * 10.0
  m = mixers.build("performer", 32, rngs=nnx.Rngs(0), num_features=16)
  y = full(m, x)
  with np.errstate(under="ignore", invalid="ignore"):  # features underflow
    assert not np.isfinite(np.asarray(naive_performer(m, x, np.float32))).all()
  # The same estimate with each query's exponents shifted by their max over
  # all its keys and features (exact, but it looks at every key at once).
  exponent = lambda z: performer_exponents(m, z)
  heads_first = lambda a: a.transpose(0, 2, 1, 3)  # [B, H, L, m]
  e = (heads_first(exponent(m.q(x)))[:, :, :, None, :]
       + heads_first(exponent(m.k(x)))[:, :, None, :, :])  # [B, H, t, s, m]
  e = np.where(causal(L_MIX)[:, :, None], e, -np.inf)
  w = np.exp(e - e.max((-1, -2), keepdims=True)).sum(-1)
  want = m.o(normalized(w, m.v(x)))
  assert np.isfinite(np.asarray(y)).all()
  assert rel_err(y, want) <= RTOL, rel_err(y, want)


# -- xpos ------------------------------------------------------------------

@pytest.mark.parametrize("scale_base", [None, 8.0])
def test_xpos_scores_depend_on_distance_only(scale_base):
  rng = np.random.default_rng(6)
  xpos = positions.build("xpos", 8, scale_base=scale_base)
  q, k = rand(rng, 1, 5, 2, 8), rand(rng, 1, 5, 2, 8)
  def dots(shift):
    pos = jnp.arange(5)[None] * 3 + shift
    return np.einsum("bthd,bshd->bhts", f64(xpos.queries(q, pos)),
                     f64(xpos.keys(k, pos)))
  np.testing.assert_allclose(dots(0), dots(17), rtol=1e-4, atol=1e-5)


def test_xpos_matches_rope_at_equal_positions_and_decays_with_distance():
  rng = np.random.default_rng(7)
  xpos = positions.build("xpos", 8, scale_base=4.0)
  rope = positions.build("rope", 8)
  q, k = rand(rng, 1, 1, 1, 8), rand(rng, 1, 1, 1, 8)
  pos = jnp.full((1, 1), 9)
  dot = lambda s, n, m: float(jnp.sum(s.queries(q, n) * s.keys(k, m)))
  np.testing.assert_allclose(dot(xpos, pos, pos), dot(rope, pos, pos), rtol=1e-5)
  # zeta < 1: queries shrink and keys grow with position, so q_n . k_m
  # carries zeta^((n - m) / scale_base), smaller the further apart.
  norm = lambda a: float(jnp.linalg.norm(a))
  assert norm(xpos.queries(q, pos)) < norm(rope.queries(q, pos))
  assert norm(xpos.keys(k, pos)) > norm(rope.keys(k, pos))
  unscaled = positions.build("xpos", 8, scale_base=None)
  np.testing.assert_allclose(unscaled.keys(k, pos), rope.keys(k, pos), rtol=1e-6)


# -- bad options -------------------------------------------------------------

@pytest.mark.parametrize("name,options,match", [
    ("linear_attention", {"kernel": "fast"},
     r"unknown linear_attention kernel 'fast'.*chunked"),
    ("retnet", {"chunk_size": 0}, "chunk_size"),
    ("gla", {"gate_temperature": 0.0}, "gate_temperature"),
    ("performer", {"num_features": 0}, "num_features"),
    ("based", {"feature_dim": 0}, "feature_dim"),
    ("retnet", {"position": {"name": "xpos", "scale_base": -1.0}}, "scale_base"),
])
def test_bad_options_name_the_problem(name, options, match):
  with pytest.raises(ValueError, match=match):
    mixers.build(name, 32, rngs=nnx.Rngs(0), **options)


def test_option_types_are_checked():
  with pytest.raises(OptionError, match="chunk_size"):
    mixers.build("gla", 32, rngs=nnx.Rngs(0), chunk_size="8")


PER_CHANNEL_GRAD = """
import jax, jax.numpy as jnp
import layers  # applies layers/_xla_flags.py before JAX starts
from layers.kernels.linear_attention import causal_linear_attention
r = jax.random.split(jax.random.key(0), 4)
q, k = (jax.random.normal(r[i], (1, 128, 4, 8)) for i in (0, 1))
v = jax.random.normal(r[2], (1, 128, 4, 16))
g = -jax.nn.softplus(jax.random.normal(r[3], (1, 128, 4, 8)))
loss = lambda *a: causal_linear_attention(*a[:3], log_decay=a[3], chunk_size=64)[0].sum()
grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, g)
print("finite", all(bool(jnp.isfinite(x).all()) for x in grads))
"""


def test_per_channel_decay_grad_runs_in_fresh_process():
  # Sub-chunked per-channel decay (GLA, RWKV-6) at chunk 64 > SUB_CHUNK:
  # on jaxlib 0.10.2 this gradient segfaulted in XLA's CPU "YNN reduce"
  # fusion until layers/_xla_flags.py turned that fusion off. Run in a
  # fresh process, with default XLA threads, so a crash is a failure here.
  from fresh_process import run_python
  proc = run_python(PER_CHANNEL_GRAD, timeout=240)
  assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
  assert "finite True" in proc.stdout


def test_xla_flags_added_only_where_needed_and_never_over_the_users():
  from layers import _xla_flags
  assert _xla_flags.needed_flags("0.10.2") == (f"{_xla_flags.YNN_FLAG}=-reduce",)
  assert _xla_flags.needed_flags("0.11.0") == ()
  mine = {"XLA_FLAGS": f"{_xla_flags.YNN_FLAG}=-dot"}
  assert _xla_flags.apply(mine) == () and mine["XLA_FLAGS"].endswith("=-dot")
