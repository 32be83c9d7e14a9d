"""Mamba / Mamba-2: scan forms against the papers' equations written out
naively (with an initial state and segment resets; Mamba-2's through its
linear-attention adapter, groups included), forms agreeing inside the
mixers, the reference inits, and bad options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import mixers
from layers.kernels import linear_attention, selective_scan
from layers.kernels.selective_scan import SELECTIVE_SCAN
from layers.mixers.mamba import ssd

Bsz, L, D, N, H, P, G = 2, 11, 3, 4, 4, 3, 2
CHUNK = 4  # does not divide L: the chunked forms pad the tail


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def resets():
  r = np.zeros((Bsz, L), bool)
  r[0, 5] = r[1, 8] = r[1, 9] = True  # mid-chunk, at a chunk start, adjacent
  return r


def s6_inputs(seed=0):
  r = np.random.default_rng(seed)
  return dict(x=r.standard_normal((Bsz, L, D)),
              dt=np.log1p(np.exp(r.standard_normal((Bsz, L, D)))),
              A=-np.exp(r.standard_normal((D, N))),
              B=r.standard_normal((Bsz, L, N)), C=r.standard_normal((Bsz, L, N)),
              h0=r.standard_normal((Bsz, D, N)), reset=resets())


def ssd_inputs(seed=0):
  r = np.random.default_rng(seed)
  return dict(x=r.standard_normal((Bsz, L, H, P)),
              dt=np.log1p(np.exp(r.standard_normal((Bsz, L, H)))),
              A=-np.exp(r.standard_normal(H)),
              B=r.standard_normal((Bsz, L, G, N)),
              C=r.standard_normal((Bsz, L, G, N)),
              h0=r.standard_normal((Bsz, H, P, N)), reset=resets())


def s6_naive(x, dt, A, B, C, h0, reset):
  """Mamba eq. (2a)-(2b) with ZOH A and Euler B, one step at a time."""
  h, ys = h0.copy(), []
  for t in range(L):
    h = np.where(reset[:, t, None, None], 0.0, h)
    h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None]
    ys.append(np.einsum("bdn,bn->bd", h, C[:, t]))
  return np.stack(ys, 1), h


def ssd_quadratic(x, dt, A, B, C, h0, reset):
  """SSD as a masked matrix (Dao & Gu 2024, eq. 6 / sec. 3):
  y_t = sum_{s<=t} (C_t . B_s) exp(dt_{s+1..t} . A) dt_s x_s
        + exp(dt_{0..t} . A) h0 C_t, terms crossing a reset dropped."""
  Bh, Ch = np.repeat(B, H // G, 2), np.repeat(C, H // G, 2)   # head -> group
  run = np.cumsum(reset, 1)
  cum = np.cumsum(dt * A, 1)                                   # [B, L, H]
  y = np.zeros_like(x)
  h_end = np.einsum("bh,bhpn->bhpn", np.exp(cum[:, -1]) * (run[:, -1] == 0)[:, None], h0)
  for t in range(L):
    keep0 = np.exp(cum[:, t]) * (run[:, t] == 0)[:, None]
    y[:, t] = np.einsum("bh,bhpn,bhn->bhp", keep0, h0, Ch[:, t])
    for s in range(t + 1):
      w = np.exp(cum[:, t] - cum[:, s]) * dt[:, s] * (run[:, s] == run[:, t])[:, None]
      y[:, t] += np.einsum("bhn,bhn,bh,bhp->bhp", Ch[:, t], Bh[:, s], w, x[:, s])
  for s in range(L):
    w = np.exp(cum[:, -1] - cum[:, s]) * dt[:, s] * (run[:, s] == run[:, -1])[:, None]
    h_end += np.einsum("bh,bhp,bhn->bhpn", w, x[:, s], Bh[:, s])
  return y, h_end


def f32(inp):
  return {k: jnp.asarray(v, jnp.float32) for k, v in inp.items() if k != "reset"}


def s6(form, inp):
  a = f32(inp)
  return SELECTIVE_SCAN.choose(form).fn(
      a["x"], a["dt"], a["A"], a["B"], a["C"], h0=a["h0"],
      reset_BxL=jnp.asarray(inp["reset"]), chunk_size=CHUNK)


def test_s6_forms_match_naive_recurrence():
  inp = s6_inputs()
  y_ref, h_ref = s6_naive(**inp)
  assert set(selective_scan.FORMS) == {"chunked", "sequential"}
  for form in selective_scan.FORMS:
    y, h = s6(form, inp)
    assert y.dtype == h.dtype == jnp.float32
    assert rel_err(y, y_ref) <= 1e-5, (form, rel_err(y, y_ref))
    assert rel_err(h, h_ref) <= 1e-5, (form, rel_err(h, h_ref))


def test_ssd_forms_match_quadratic_form():
  inp = ssd_inputs()
  y_ref, h_ref = ssd_quadratic(**inp)
  a = f32(inp)
  segment_ids = jnp.asarray(np.cumsum(inp["reset"], 1), jnp.int32)
  for form in linear_attention.FORMS:
    y, h_BxHxNxP = ssd(a["x"], a["dt"], a["A"], a["B"], a["C"],
                       state=jnp.swapaxes(a["h0"], -1, -2),
                       segment_ids=segment_ids, kernel=form, chunk_size=CHUNK)
    assert y.dtype == h_BxHxNxP.dtype == jnp.float32
    assert rel_err(y, y_ref) <= 1e-5, (form, rel_err(y, y_ref))
    h = jnp.swapaxes(h_BxHxNxP, -1, -2)
    assert rel_err(h, h_ref) <= 1e-5, (form, rel_err(h, h_ref))


def test_s6_forms_agree_in_gradients():
  inp = s6_inputs(1)
  w = np.random.default_rng(2).standard_normal(inp["x"].shape)
  names = ("x", "dt", "A", "B", "C", "h0")

  def grads(form):
    def loss(*args):
      y, h = s6(form, dict(zip(names, args), reset=inp["reset"]))
      return jnp.sum(y * w) + jnp.sum(h)
    return jax.grad(loss, argnums=tuple(range(6)))(*(inp[k] for k in names))

  for g_seq, g_chunk in zip(grads("sequential"), grads("chunked")):
    assert np.isfinite(np.asarray(g_chunk)).all()
    assert rel_err(g_chunk, g_seq) <= 1e-5


@pytest.mark.parametrize("name,opts,seq,chunk", [
    ("mamba", dict(d_state=4), dict(kernel="sequential"),
     dict(kernel="chunked")),
    ("mamba2", dict(d_state=8, head_dim=16, n_groups=2),
     dict(kernel="recurrent"), dict(kernel="chunked"))])
def test_mixer_forms_agree_with_segments(name, opts, seq, chunk):
  seq = mixers.build(name, 32, rngs=nnx.Rngs(0), **seq, **opts)
  chunk = mixers.build(name, 32, rngs=nnx.Rngs(0), chunk_size=5, **chunk,
                       **opts)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 13, 32)),
                  jnp.float32)
  seg = jnp.asarray([[0] * 4 + [1] * 9, [2] * 12 + [3]], jnp.int32)
  assert rel_err(chunk(x, segment_ids=seg), seq(x, segment_ids=seg)) <= 1e-5


def test_reference_inits():
  m = mixers.build("mamba", 32, rngs=nnx.Rngs(0), d_state=4, dt_min=0.01,
                   dt_max=0.05)
  dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
  assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
  np.testing.assert_allclose(np.exp(np.asarray(m.A_log[...])),  # S4D-real
                             np.tile(np.arange(1, 5), (64, 1)), rtol=1e-6)
  m2 = mixers.build("mamba2", 32, rngs=nnx.Rngs(0), head_dim=8)
  a = np.exp(np.asarray(m2.A_log[...]))
  assert a.shape == (8,) and a.min() >= 1 and a.max() <= 16


@pytest.mark.parametrize("name,opts,match", [
    ("mamba", dict(expand=0), "expand must be an int >= 1"),
    ("mamba", dict(d_state=0), "d_state must be an int >= 1"),
    ("mamba", dict(dt_rank=0), "dt_rank must be an int >= 1"),
    ("mamba", dict(chunk_size=0), "chunk_size must be an int >= 1"),
    ("mamba", dict(d_state=2.5), "d_state.*must be int"),
    ("mamba", dict(kernel="cuda"), "unknown selective_scan kernel 'cuda'.*chunked"),
    ("mamba", dict(dt_min=0.5, dt_max=0.1), "dt_min <= dt_max"),
    ("mamba2", dict(d_conv=0), "d_conv must be an int >= 1"),
    ("mamba2", dict(head_dim=48), "not a multiple of head_dim=48"),
    ("mamba2", dict(head_dim=16, n_groups=3), "not a multiple of n_groups=3"),
    ("mamba2", dict(kernel="associative"),
     "unknown linear_attention kernel 'associative'.*chunked"),
])
def test_bad_options(name, opts, match):
  with pytest.raises(ValueError, match=match):
    mixers.build(name, 32, rngs=nnx.Rngs(0), **opts)
