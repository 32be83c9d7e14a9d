"""RWKV-4 / RWKV-6: WKV kernel forms agree with each other and with the
papers' equations written naively (float64 numpy), mixers and the channel
mix against naive token-by-token references, and option errors."""

import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from layers import channel, mixers
from layers.kernels.wkv import WKV4State, wkv4_chunked, wkv4_recurrent
from layers.mixers.rwkv import wkv6
from mixer_contract import rel_err

B, L, D = 2, 11, 32  # D as in the contract suite, so inits compile once


# Sequence starts inside the rows (packed segments): row 0 at t=3 and at
# t=8 (a chunk boundary for chunk size 4), row 1 at t=5.
RESET = np.zeros((B, L), bool)
RESET[0, [3, 8]] = RESET[1, 5] = True
SEG = np.cumsum(RESET, axis=1)  # 0: still sees the initial state


def naive_wkv4(w, u, k, v, num0=0.0, den0=0.0, seg=None):
  """The RWKV-4 equation as sums over the past of the same segment,
  float64; num0/den0 are unscaled sums before the first token. Returns the
  outputs and the unscaled sums after the last token."""
  n = k.shape[1]
  seg = np.zeros(k.shape[:2], int) if seg is None else seg

  def past(t):  # sums over i < t in the segment of token t (the last, at n)
    s_t = seg[:, min(t, n - 1), None]
    e = np.exp((t - 1 - np.arange(t))[:, None] * w + k[:, :t])
    e = e * (seg[:, :t] == s_t)[..., None]
    live = (s_t == 0) * np.exp(t * w)  # the initial state, decayed t steps
    return live * num0 + (e * v[:, :t]).sum(1), live * den0 + e.sum(1)

  y = np.zeros_like(k)
  for t in range(n):
    num, den = past(t)
    bonus = np.exp(u + k[:, t])
    y[:, t] = (num + bonus * v[:, t]) / (den + bonus)
  return y, past(n)


def naive_wkv6(r, k, v, logw, u, S, reset=RESET):
  y = np.zeros(v.shape)
  for t in range(r.shape[1]):
    S = np.where(reset[:, t, None, None, None], 0.0, S)
    kv = k[:, t, :, :, None] * v[:, t, :, None, :]
    y[:, t] = np.einsum("bhk,bhkv->bhv", r[:, t], S + u[..., None] * kv)
    S = np.exp(logw[:, t])[..., None] * S + kv
  return y, S


FORMS4 = {"recurrent": jax.jit(wkv4_recurrent),
          **{f"chunk{c}": jax.jit(functools.partial(wkv4_chunked, chunk_size=c))
             for c in (4, 64)}}
FORMS6 = {f"{form}{c}": functools.partial(wkv6, kernel=form, chunk_size=c)
          for form, c in (("recurrent", 4), ("parallel", 4), ("chunked", 4),
                          ("chunked", 64))}


def test_wkv4_forms_match_equation_with_state_resets_and_large_keys():
  rng = np.random.default_rng(0)
  C = 5
  w = -np.exp(rng.standard_normal(C))
  u = rng.standard_normal(C)
  k = rng.standard_normal((B, L, C)) * 3
  k[0, 4] = k[1, 2] = 60.0  # e^60 overflows a naive fp32 sum; max tracking must not
  v = rng.standard_normal((B, L, C))
  num0, den0 = rng.standard_normal((B, C)), np.exp(rng.standard_normal((B, C)))
  ref, end = naive_wkv4(w, u, k, v, num0, den0, SEG)
  args = [jnp.asarray(a, jnp.float32) for a in (w, u, k, v)]
  scale = np.full((B, C), 3.0)  # the same sums, stored scaled by e^{-max}
  s0 = WKV4State(*(jnp.asarray(a, jnp.float32) for a in
                   (num0 * np.exp(-scale), den0 * np.exp(-scale), scale)))
  for name, fn in FORMS4.items():
    y, s = fn(*args, s0, jnp.asarray(RESET))
    assert rel_err(y, ref) < 1e-5, name
    scale = np.exp(np.asarray(s.max, np.float64))
    assert rel_err(np.asarray(s.num) * scale, end[0]) < 1e-5, name
    assert rel_err(np.asarray(s.den) * scale, end[1]) < 1e-5, name


def test_wkv6_forms_match_equation_with_state_resets_and_strong_decay():
  rng = np.random.default_rng(1)
  H, K, V = 2, 3, 4
  r, k = rng.standard_normal((2, B, L, H, K))
  v = rng.standard_normal((B, L, H, V))
  logw = -np.exp(rng.standard_normal((B, L, H, K)))
  logw[:, 5:9] = -40.0  # e^{+160}: a factorized chunk would overflow
  u = rng.standard_normal((H, K))
  S0 = rng.standard_normal((B, H, K, V))
  ref, S_ref = naive_wkv6(r, k, v, logw, u, S0)
  args = [jnp.asarray(a, jnp.float32) for a in (r, k, v, logw, u, S0)]
  for name, fn in FORMS6.items():
    y, S = jax.jit(fn)(*args, segment_ids=jnp.asarray(SEG, jnp.int32))
    assert rel_err(y, ref) < 1e-5 and rel_err(S, S_ref) < 1e-5, name


run = nnx.jit(lambda m, x: m(x))


def assert_forms_match(m, x, ref, option, forms):
  for form in forms:
    setattr(m, option, form)
    assert rel_err(run(m, jnp.asarray(x, jnp.float32)), ref) < 1e-5, form


def params(module):
  return jax.tree.map(lambda p: np.asarray(p, np.float64),
                      nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def inputs(seed, shape=(B, L, D)):
  return np.random.default_rng(seed).standard_normal(shape)


def shifted(x):
  return np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def sigmoid(z):
  return 1 / (1 + np.exp(-z))


def lerp(x, prev, mu):
  return prev + (x - prev) * mu


def test_rwkv4_mixer_matches_paper_equations_in_both_forms():
  m = mixers.build("rwkv4", D, rngs=nnx.Rngs(0))
  p = params(m)
  x = inputs(1)
  prev = shifted(x)
  k = lerp(x, prev, p["mu_k"]) @ p["key"]["kernel"]
  v = lerp(x, prev, p["mu_v"]) @ p["value"]["kernel"]
  r = sigmoid(lerp(x, prev, p["mu_r"]) @ p["receptance"]["kernel"])
  wkv, _ = naive_wkv4(-np.exp(p["time_decay"]), p["time_first"], k, v)
  ref = (r * wkv) @ p["output"]["kernel"]
  assert_forms_match(m, x, ref, "kernel", ("recurrent", "chunked"))


def test_rwkv6_mixer_matches_paper_equations_in_both_forms():
  m = mixers.build("rwkv6", D, rngs=nnx.Rngs(0), head_dim=16)
  p = params(m)
  # Scale the LoRAs up so that the data-dependent parts matter.
  for name in ("mix_a", "mix_b", "decay_a", "decay_b"):
    p[name] = p[name] * 50
  nnx.update(m, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p))
  x = inputs(2)
  prev = shifted(x)
  lo = np.tanh(np.einsum("bld,dsr->blsr", lerp(x, prev, p["mu_x"]), p["mix_a"]))
  mu = p["mu"] + np.einsum("blsr,srd->blsd", lo, p["mix_b"])
  xw, xk, xv, xr, xg = (lerp(x, prev, mu[:, :, i]) for i in range(5))
  proj = lambda z, name: np.einsum("bld,dhk->blhk", z, p[name]["kernel"])
  logw = -np.exp(p["decay"] + np.einsum("blr,rhk->blhk", np.tanh(xw @ p["decay_a"]),
                                        p["decay_b"]))
  H, K = p["decay"].shape
  y, _ = naive_wkv6(proj(xr, "receptance"), proj(xk, "key"), proj(xv, "value"),
                    logw, p["bonus"], np.zeros((B, H, K, K)), np.zeros((B, L), bool))
  y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 64e-5)
  y = y * p["out_gate"]["scale"] + p["out_gate"]["bias"]
  g = np.einsum("bld,dhk->blhk", xg, p["out_gate"]["gate"]["kernel"])
  ref = np.einsum("blhk,hkd->bld", y * g * sigmoid(g), p["output"]["kernel"])
  assert_forms_match(m, x, ref, "kernel", ("recurrent", "parallel", "chunked"))


def test_rwkv_channel_matches_equation_and_decodes_with_segments():
  cm = channel.build("rwkv4_channel", D, rngs=nnx.Rngs(0))
  p = params(cm)
  x = inputs(3)
  seg = np.array([[0] * 4 + [1] * (L - 4), [2] * L])

  def ref(x):
    prev = shifted(x)
    k = np.square(np.maximum(lerp(x, prev, p["mu_k"]) @ p["key"]["kernel"], 0))
    r = sigmoid(lerp(x, prev, p["mu_r"]) @ p["receptance"]["kernel"])
    return r * (k @ p["value"]["kernel"])

  xj = jnp.asarray(x, jnp.float32)
  assert rel_err(cm(xj), ref(x)) < 1e-5
  cache = cm.init_cache(B, L)
  pieces = []
  for a, b in ((0, 3), (3, 4), (4, L)):
    y, cache = cm(xj[:, a:b], cache=cache)
    pieces.append(y)
  assert rel_err(jnp.concatenate(pieces, 1), ref(x)) < 1e-5
  packed = cm(xj, segment_ids=jnp.asarray(seg))
  assert rel_err(packed[0, 4:], ref(x[:1, 4:])[0]) < 1e-5
  assert rel_err(packed[1], ref(x[1:])[0]) < 1e-5


@pytest.mark.parametrize("name,options,match", [
    ("rwkv4", {"kernel": "cuda"}, "unknown wkv4 kernel"),
    ("rwkv6", {"kernel": "fused", "head_dim": 16},
     "unknown linear_attention kernel 'fused'"),
    ("rwkv6", {"chunk_size": 0, "head_dim": 16}, "chunk_size"),
    ("rwkv6", {"head_dim": 5}, "multiple of head_dim"),
    ("rwkv6", {"head_dim": 0}, "multiple of head_dim"),
    ("rwkv6", {"mix_rank": 0, "head_dim": 16}, "mix_rank"),
])
def test_bad_options(name, options, match):
  with pytest.raises(ValueError, match=match):
    mixers.build(name, D, rngs=nnx.Rngs(0), **options)


def test_chunk_size_must_be_positive():
  z = jnp.zeros((1, 3, 2))
  with pytest.raises(ValueError, match="chunk_size"):
    wkv4_chunked(z[0, 0], z[0, 0], z, z, WKV4State.zeros(1, 2),
                 jnp.zeros((1, 3), bool), chunk_size=0)
