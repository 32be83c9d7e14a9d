"""State-space and long-convolution mixers: every form against the others
and against naive float64 loops written from the papers' equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixer_contract as mc
from layers import mixers
from layers.kernels.fftconv import causal_conv, conv_rows
from layers.kernels.linear_recurrence import linear_scan
from layers.kernels.ssm import (bilinear_conj_dplr, discretize_diag,
                                dplr_kernel, vandermonde_kernel)
from layers.mixers.dss import inv_geometric_sum
from layers.blocks.conv import ShortConv
from layers.blocks.ssm import hippo_legs_nplr, s4d_eigenvalues
from layers.params import fan_in_init

# The contract suite's shapes and the mixers' default sizes, so that compiled
# programs are shared with it when the suite runs in one process.
B, L, D = 2, 16, 32
WIDE_DT = {"dt_min": 0.05, "dt_max": 0.5}   # steps large enough to matter


def rel(a, b):
  a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def rng(seed=0):
  return np.random.default_rng(seed)


def cnormal(r, shape, scale=1.0):
  return scale * (r.standard_normal(shape) + 1j * r.standard_normal(shape))


def f64(p):
  return np.asarray(p[...], np.float64)


def pair(p):
  """A complex parameter stored as (re, im) pairs, as complex128."""
  v = f64(p)
  return v[..., 0] + 1j * v[..., 1]


def naive_conv(u, k):
  """y[:, t] = sum_{t-len(k) < s <= t} k[t-s] u[:, s], float64 loops."""
  y = np.zeros(u.shape[:2] + np.broadcast_shapes(u.shape[2:], k.shape[1:]))
  for t in range(u.shape[1]):
    for s in range(max(0, t + 1 - len(k)), t + 1):
      y[:, t] += k[t - s] * u[:, s]
  return y


def naive_diag_ssm(Abar, Bbar, C, u):
  """x_t = Abar x_{t-1} + Bbar u_t, y_t = 2 Re(sum_n C x_t), trailing-channel
  broadcasting; u [B, L, ..., H], Abar/Bbar/C [H, N]."""
  x = np.zeros(u.shape[:1] + u.shape[2:] + Abar.shape[-1:], np.complex128)
  ys = []
  for t in range(u.shape[1]):
    x = Abar * x + Bbar * u[:, t, ..., None]
    ys.append(2 * np.sum(C * x, -1).real)
  return np.stack(ys, 1)


def bilinear_np(A, b, dt):
  """Bilinear discretization per channel by dense solves, float64:
  A [..., N, N], b [..., N] (broadcast over dt [H]) -> Abar, Bbar."""
  h = 0.5 * np.asarray(dt)[:, None, None]
  eye = np.eye(A.shape[-1])
  M = eye - h * A
  Abar = np.linalg.solve(M, eye + h * A)
  b = np.broadcast_to(b, Abar.shape[:-1])
  return Abar, np.linalg.solve(M, 2 * h * b[..., None])[..., 0]


def dplr_np(Lambda, P):
  """diag(Lambda) - P P^*: [..., N] -> [..., N, N]."""
  return (np.eye(Lambda.shape[-1]) * Lambda[..., None]
          - P[..., :, None] * P[..., None, :].conj())


def lti_kernel(Abar, Bbar, c, length):
  """K_l = c Abar^l Bbar per channel: Abar [H, N, N], Bbar, c [H, N] ->
  [length, H], float64 loops."""
  out, x = [], Bbar
  for _ in range(length):
    out.append(np.sum(c * x, -1))
    x = np.einsum("hmn,hn->hm", Abar, x)
  return np.stack(out)


# -- kernels ------------------------------------------------------------------


def test_fft_conv_matches_direct_and_naive():
  r = rng(1)
  u = r.standard_normal((B, L, 3, 4))
  k = r.standard_normal((L, 4)) * np.exp(-0.1 * np.arange(L))[:, None]
  ref = naive_conv(u, k)
  fft = causal_conv(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32), "fft")
  direct = causal_conv(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32),
                       "direct")
  assert rel(fft, ref) < 1e-5 and rel(direct, ref) < 1e-5
  # The zero padding is what keeps it causal: late inputs reach no early output.
  u2 = u.copy()
  u2[:, -1] += 100.0
  fft2 = causal_conv(jnp.asarray(u2, jnp.float32), jnp.asarray(k, jnp.float32), "fft")
  assert rel(fft2[:, :-1], fft[:, :-1]) < 1e-5


def test_conv_rows_is_a_slice_of_the_full_conv():
  r = rng(2)
  u = r.standard_normal((B, L, 3))
  k = r.standard_normal((L, 3))
  rows = jnp.arange(5, 9)
  got = conv_rows(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32), rows)
  assert rel(got, naive_conv(u, k)[:, 5:9]) < 1e-5


def test_associative_scan_matches_sequential_and_naive():
  r = rng(3)
  a = 0.9 * np.exp(1j * r.uniform(0, np.pi, (B, L, 3)))
  a[:, 7] = 0.0                                   # a reset mid-sequence
  b = cnormal(r, (B, L, 3))
  h0 = cnormal(r, (B, 3))
  h, ref = h0, []
  for t in range(L):
    h = a[:, t] * h + b[:, t]
    ref.append(h)
  ref = np.stack(ref, 1)
  args = [jnp.asarray(v, jnp.complex64) for v in (a, b, h0)]
  assert rel(linear_scan(*args, kernel="associative")[0], ref) < 1e-5
  assert rel(linear_scan(*args, kernel="sequential")[0], ref) < 1e-5


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_discretization_kernel_matches_its_recurrence(method):
  """K_l = 2 Re(C Abar^l Bbar) from log Abar equals a float64 recurrence
  with the paper's Abar, Bbar, for each discretization."""
  r = rng(4)
  A = -np.exp(r.uniform(-1, 1, (3, 4))) + 1j * r.uniform(0, 10, (3, 4))
  dt = np.exp(r.uniform(np.log(0.05), np.log(0.5), (3, 1)))
  C = cnormal(r, (3, 4))
  if method == "zoh":
    Abar, Bbar = np.exp(dt * A), (np.exp(dt * A) - 1) / A
  else:
    Abar = (1 + dt * A / 2) / (1 - dt * A / 2)
    Bbar = dt / (1 - dt * A / 2)
  impulse = np.zeros((1, L, 3))
  impulse[:, 0] = 1.0
  ref = naive_diag_ssm(Abar, Bbar, C, impulse)[0]
  log_a, b = discretize_diag(jnp.asarray(dt, jnp.float32),
                             jnp.asarray(A, jnp.complex64), method)
  k = vandermonde_kernel(log_a, b * jnp.asarray(C, jnp.complex64), L)
  assert rel(k, ref) < 1e-5


def test_zoh_and_bilinear_agree_for_small_steps_only():
  A = jnp.asarray(-0.5 + 1j * np.pi * np.arange(4), jnp.complex64)
  C = jnp.ones(4, jnp.complex64)
  def kernels(dt):
    out = []
    for m in ("zoh", "bilinear"):
      log_a, b = discretize_diag(jnp.float32(dt), A, m)
      out.append(vandermonde_kernel(log_a[None], (b * C)[None], L))
    return out
  assert rel(*kernels(1e-3)) < 1e-4      # both -> the continuous system
  assert rel(*kernels(0.5)) > 1e-2       # and genuinely different methods


def test_discretization_name_is_checked():
  with pytest.raises(ValueError, match="zoh"):
    discretize_diag(jnp.ones(()), jnp.ones((), jnp.complex64), "euler")


# -- S4D ----------------------------------------------------------------------


def s4d_numpy(core):
  """Abar, Bbar, C (float64) from an S4DSSM's parameters, by the paper."""
  A = -np.exp(f64(core.a_log)) + 1j * f64(core.a_imag)
  dt = np.exp(f64(core.log_dt))[:, None]
  if core.discretization == "zoh":
    Abar, Bbar = np.exp(dt * A), np.expm1(dt * A) / A
  else:
    Abar, Bbar = (1 + dt * A / 2) / (1 - dt * A / 2), dt / (1 - dt * A / 2)
  return Abar, Bbar, pair(core.C)


def test_s4d_init_formulas():
  N = 8
  lin, inv = s4d_eigenvalues("lin", N), s4d_eigenvalues("inv", N)
  n = np.arange(N // 2)
  np.testing.assert_allclose(lin, -0.5 + 1j * np.pi * n)
  np.testing.assert_allclose(inv, -0.5 + 1j * N / np.pi * (N / (2 * n + 1) - 1))


@pytest.mark.parametrize("init,method", [("lin", "zoh"), ("inv", "bilinear")])
def test_s4d_forms_match_naive(init, method):
  core = mixers.build("s4d", D, rngs=nnx.Rngs(0), init=init,
                      discretization=method, **WIDE_DT).core
  u = rng(5).standard_normal((B, L, D))
  Abar, Bbar, C = s4d_numpy(core)
  ref = naive_diag_ssm(Abar, Bbar, C, u) + f64(core.D) * u
  u32 = jnp.asarray(u, jnp.float32)
  assert rel(core(u32), ref) < 1e-5
  core.kernel = "direct"
  assert rel(core(u32), ref) < 1e-5
  y, _ = core.step(u32, core.init_state((B,)))
  assert rel(y, ref) < 1e-5


# -- S4 -----------------------------------------------------------------------


def test_hippo_nplr_reconstructs_legs():
  N = 8
  Lambda, p, b, V = hippo_legs_nplr(N)
  n = np.arange(N)
  legs = -np.tril(np.sqrt(2 * n + 1)[:, None] * np.sqrt(2 * n + 1)[None, :], -1)
  legs -= np.diag(n + 1.0)
  S = V @ np.diag(Lambda) @ V.conj().T
  S = S + S.conj()                                  # add the conjugate modes
  P = np.sqrt(n + 0.5)
  np.testing.assert_allclose(S - np.outer(P, P), legs, atol=1e-10)
  np.testing.assert_allclose(Lambda.real, -0.5)
  np.testing.assert_allclose(V.conj().T @ P, p)
  np.testing.assert_allclose(V.conj().T @ np.sqrt(2 * n + 1), b)
  clipped = hippo_legs_nplr(N, b_clip=2.0)[2]       # as the S4 code's nplr
  np.testing.assert_allclose(clipped.real, b.real)
  np.testing.assert_allclose(clipped.imag, np.clip(b.imag, -2, 2))
  assert np.abs(b.imag).max() > 2                   # so the clip acts


def test_s4_kernels_match_naive_dplr_recurrence():
  """Random N/2 modes: both kernels are the full N-state system over the
  modes and their conjugates, A = diag(Lambda_f) - P_f P_f^*, whose
  rank-one term couples the halves."""
  r = rng(6)
  H, n = 3, 6
  Lam = -np.exp(r.uniform(-1, 0.5, (H, n))) + 1j * r.uniform(0, 8, (H, n))
  P, Bv, C = cnormal(r, (H, n), 0.5), cnormal(r, (H, n)), cnormal(r, (H, n))
  dt = np.exp(r.uniform(np.log(0.05), np.log(0.5), H))
  full = lambda v: np.concatenate([v, v.conj()], -1)
  Abar, Bbar = bilinear_np(dplr_np(full(Lam), full(P)), full(Bv), dt)
  ref = lti_kernel(Abar, Bbar, full(C), L)
  assert np.abs(ref.imag).max() < 1e-12 * np.abs(ref).max()   # a real system
  args = [jnp.asarray(v, jnp.complex64) for v in (Lam, P, Bv, C)]
  dt32 = jnp.asarray(dt, jnp.float32)
  for kernel in ("cauchy", "dense"):
    assert rel(dplr_kernel(*args, dt32, L, kernel), ref.real) < 2e-5, kernel


def test_s4_full_matches_recurrence():
  m = mixers.build("s4", D, rngs=nnx.Rngs(0), **WIDE_DT)
  u = jnp.asarray(rng(7).standard_normal((B, L, D)), jnp.float32)
  y, _ = m.core.step(u, m.core.init_state((B,)))
  # The Cauchy path subtracts Woodbury terms ~|P|^2 ~ N^2/2 larger than the
  # kernel, so in fp32 it is the least exact form (see the S4 docstring).
  assert rel(m.core(u), y) < 5e-5
  m.core.dplr_kernel = "dense"
  assert rel(m.core(u), y) < 1e-5


# -- S4 against HiPPO-LegS, written out here ------------------------------------


def legs(N):
  """The real HiPPO-LegS A [N, N] and b [N] (S4 paper, eq. (2)), float64,
  entry by entry."""
  A = np.zeros((N, N))
  for n in range(N):
    A[n, n] = -(n + 1.0)
    for k in range(n):
      A[n, k] = -np.sqrt(2 * n + 1.0) * np.sqrt(2 * k + 1.0)
  return A, np.sqrt(2 * np.arange(N) + 1.0)


def legs_basis(core):
  """The eigenvectors V [N, N/2] of LegS's normal part A + p p^T (p_n =
  sqrt(n + 1/2)) in which the S4 core's parameters are written: by
  np.linalg.eig (not the layer's eigh), the modes in the core's order,
  each column's phase (free in any eigensolver) fixed by V^* p = P."""
  H, n = pair(core.P).shape
  A, _ = legs(2 * n)
  p = np.sqrt(np.arange(2 * n) + 0.5)
  lam, V = np.linalg.eig(A + np.outer(p, p))
  Lambda = -np.exp(f64(core.lambda_log_re)) + 1j * f64(core.lambda_im)
  mode = np.abs(lam[:, None] - Lambda[0]).argmin(0)
  np.testing.assert_allclose(Lambda, np.broadcast_to(lam[mode], (H, n)), rtol=1e-6)
  V = V[:, mode]
  w = (V.conj().T @ p) / pair(core.P)[0]
  np.testing.assert_allclose(np.abs(w), 1.0, rtol=1e-5)
  return V * (w / np.abs(w))


def legs_system(core, b_clip):
  """LegS discretized bilinearly with the core's dt (Abar [H, N, N], Bbar
  [H, N]) and the core's C as the real output row c [H, N]; b with
  Im(V^* b) clipped to +-b_clip when given, as the S4 code's init does."""
  V = legs_basis(core)
  A, b = legs(2 * V.shape[1])
  if b_clip is not None:
    Bm = V.conj().T @ b
    b = 2 * (V @ (Bm.real + 1j * np.clip(Bm.imag, -b_clip, b_clip))).real
  c = 2 * (pair(core.C) @ V.conj().T).real        # C_f V_f^*, real
  return (*bilinear_np(A, b, np.exp(f64(core.log_dt))), c)


def half_system_kernel(core, length):
  """The S4 kernel as the earlier code had it, planted: the N/2 kept modes
  with their own rank-one term, A = diag(Lambda) - P P^*, uncoupled from
  the conjugate half."""
  Lambda = -np.exp(f64(core.lambda_log_re)) + 1j * f64(core.lambda_im)
  P, Bv, C = pair(core.P), pair(core.B), pair(core.C)
  Abar, Bbar = bilinear_np(dplr_np(Lambda, P), Bv, np.exp(f64(core.log_dt)))
  return 2 * lti_kernel(Abar, Bbar, C, length).real


@pytest.mark.parametrize("b_clip", [None, 2.0])
def test_s4_is_hippo_legs_at_init(b_clip):
  """At init the S4 mixer's kernels (both algorithms) and recurrence are
  the real N x N LegS SSM's, paper sizes (N = 64, dt in [1e-3, 1e-1]);
  the earlier half-system kernel (planted) is far from it."""
  m = mixers.build("s4", D, rngs=nnx.Rngs(0), b_clip=b_clip)
  Abar, Bbar, c = legs_system(m.core, b_clip)
  ref = lti_kernel(Abar, Bbar, c, L)
  for kernel in ("cauchy", "dense"):
    assert rel(dplr_kernel(*m.core.matrices(), L, kernel), ref) < 1e-5, kernel
  u = rng(13).standard_normal((B, L, D))
  y, _ = m.core.step(jnp.asarray(u, jnp.float32), m.core.init_state((B,)))
  assert rel(y, naive_conv(u, ref) + f64(m.core.D) * u) < 1e-5
  assert rel(half_system_kernel(m.core, L), ref) > 0.1


def test_s4_slowest_mode_decays_like_legs():
  """LegS's spectrum is -1, ..., -N; the S4 layer's discretized Abar,
  mapped back through the bilinear transform, has its slowest mode at -1
  (the earlier half system's was at -0.52)."""
  core = mixers.build("s4", D, rngs=nnx.Rngs(0)).core
  Lambda, P, Bv, _, dt = core.matrices()
  mu = np.linalg.eigvals(np.asarray(bilinear_conj_dplr(dt, Lambda, P, Bv)[0],
                                    np.float64))              # [H, N]
  dt = np.asarray(dt, np.float64)[:, None]
  slowest = ((2 / dt) * (mu - 1) / (mu + 1)).real.max(-1)
  np.testing.assert_allclose(slowest, -1.0, atol=1e-2)


# -- DSS ----------------------------------------------------------------------


def test_inv_geometric_sum_both_signs():
  z = np.array([-0.3 + 2j, 0.2 - 1j, 1e-3 + 0.5j, -2.0 + 0j])
  for n in (1, 7, 64):
    ref = 1 / np.exp(np.arange(n)[:, None] * z).sum(0)
    got = inv_geometric_sum(jnp.asarray(z, jnp.complex64), n)
    assert rel(got, ref) < 1e-5, n


def test_dss_kernel_matches_paper_softmax():
  """K = Re(w Lambda^-1 row-softmax(P)), P_{n,l} = lambda_n l dt, with the
  paper's max-subtracted softmax, over conjugate pairs, at L = norm_len;
  one mode has Re(lambda) > 0, which DSS-softmax allows."""
  m = mixers.build("dss", D, rngs=nnx.Rngs(0), norm_len=L, **WIDE_DT)
  core = m.core
  core.lambda_re[...] = core.lambda_re[...].at[:, 0].set(0.7)
  lam = f64(core.lambda_re) + 1j * f64(core.lambda_im)
  dt = np.exp(f64(core.log_dt))[:, None, None]
  Pm = lam[..., None] * dt * np.arange(L)                   # [H, N/2, L]
  Pm = Pm - np.take_along_axis(Pm, Pm.real.argmax(-1)[..., None], -1)
  S = np.exp(Pm) / np.exp(Pm).sum(-1, keepdims=True)
  ref = 2 * np.einsum("hn,hnl->lh", pair(core.W) / lam, S).real
  log_a, b, c = core.system()
  assert rel(vandermonde_kernel(log_a, b * c, L), ref) < 1e-4
  u = jnp.asarray(rng(8).standard_normal((B, L, D)), jnp.float32)
  y, _ = core.step(u, core.init_state((B,)))
  assert rel(core(u), y) < 1e-5


# -- S5 -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_s5_scans_match_naive_mimo_recurrence(method):
  m = mixers.build("s5", D, rngs=nnx.Rngs(0), discretization=method, **WIDE_DT)
  u = rng(9).standard_normal((B, L, D))
  A = -np.exp(f64(m.lambda_log_re)) + 1j * f64(m.lambda_im)
  dt = np.exp(f64(m.log_dt))
  if method == "zoh":
    Abar, scale = np.exp(dt * A), np.expm1(dt * A) / A
  else:
    Abar, scale = (1 + dt * A / 2) / (1 - dt * A / 2), dt / (1 - dt * A / 2)
  Bbar, C = scale[:, None] * pair(m.B), pair(m.C)
  x, ys = np.zeros((B, len(A)), complex), []
  for t in range(L):
    x = Abar * x + u[:, t] @ Bbar.T
    ys.append(2 * (x @ C.T).real)
  ssm = np.stack(ys, 1) + f64(m.D) * u
  g = jax.nn.gelu(jnp.asarray(ssm, jnp.float32))
  ref = g * jax.nn.sigmoid(m.out.proj(g)[..., 0, :])
  u32 = jnp.asarray(u, jnp.float32)
  for kernel in ("associative", "sequential"):
    m.kernel = kernel
    assert rel(m(u32), ref) < 1e-5, kernel


# -- H3 -----------------------------------------------------------------------


def test_h3_matches_naive_multihead():
  m = mixers.build("h3", D, rngs=nnx.Rngs(0), **WIDE_DT)
  x = jnp.asarray(rng(10).standard_normal((B, L, D)), jnp.float32)
  q, k, v = (np.asarray(f(x), np.float64) for f in (m.q, m.k, m.v))  # [B,L,H,d]
  kbar = naive_conv(k, f64(m.shift.weight)[::-1])
  kv = np.einsum("blhi,blhj->blijh", kbar, v)
  Abar, Bbar, C = s4d_numpy(m.ssm)
  s = naive_diag_ssm(Abar, Bbar, C, kv) + f64(m.ssm.D) * kv
  o = np.einsum("blhi,blijh->blhj", q, s)
  ref = m.o(jnp.asarray(o, jnp.float32))
  assert rel(m(x), ref) < 1e-5


def test_short_conv_pieces_match_naive():
  conv = ShortConv((2, 3), 4, rngs=nnx.Rngs(0), axes=(None, "embed"),
                   bias_init=fan_in_init(4))  # non-zero, so the bias counts
  x = rng(11).standard_normal((B, L, 2, 3))
  ref = naive_conv(x, f64(conv.weight)[::-1])
  ref = ref + f64(conv.bias)
  x32 = jnp.asarray(x, jnp.float32)
  y, _ = conv(x32)
  assert rel(y, ref) < 1e-5
  a, state = conv(x32[:, :2])                        # shorter than width - 1
  b, _ = conv(x32[:, 2:], state)
  assert rel(jnp.concatenate([a, b], 1), ref) < 1e-5


# -- Hyena --------------------------------------------------------------------


@pytest.mark.parametrize("order", [2, 3])
def test_hyena_matches_naive(order):
  m = mixers.build("hyena", D, rngs=nnx.Rngs(0), order=order, filter_scale=8)
  x = jnp.asarray(rng(12).standard_normal((B, L, D)), jnp.float32)
  u = np.asarray(m.in_proj(x), np.float64)                    # [B, L, N+1, D]
  u = naive_conv(u, f64(m.short.weight)[::-1])
  u = u + f64(m.short.bias)
  h = np.asarray(m.filter(L), np.float64)                     # [L, N-1, D]
  bias = f64(m.bias)
  z = u[:, :, order]
  for n in range(order - 1):
    z = z * u[:, :, order - 1 - n]
    z = naive_conv(z, h[:, n]) + bias[n] * z
  ref = m.out_proj(jnp.asarray(z * u[:, :, 0], jnp.float32))
  assert rel(m(x), ref) < 1e-5


def test_hyena_decode_matches_full_at_order_3():
  """The contract suite decodes the default order 2 (one long convolution);
  order 3 stacks two in one input history, each level in its own slot."""
  m = mixers.build("hyena", D, rngs=nnx.Rngs(0), order=3, filter_scale=8)
  x = mc.inputs(13)
  y, _ = mc.run_pieces(m, x, [5, 1, L - 6], L)
  assert rel(y, mc.full(m, x)) < 1e-5


def test_hyena_filter_is_defined_for_any_length():
  m = mixers.build("hyena", D, rngs=nnx.Rngs(0), filter_scale=8)
  long = m.filter(4 * L)                  # well past filter_scale
  assert np.isfinite(np.asarray(long)).all()
  assert rel(m.filter(L), long[:L]) < 1e-6


# -- options ------------------------------------------------------------------


@pytest.mark.parametrize("name,options,needle", [
    ("s4d", {"discretization": "euler"}, "discretization"),
    ("s4d", {"init": "legs"}, "init"),
    ("s4d", {"state_dim": 7}, "state_dim"),
    ("s4d", {"kernel": "cuda"}, "kernel"),
    ("s4d", {"dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
    ("s4", {"dplr_kernel": "woodbury"}, "dplr_kernel"),
    ("s4", {"b_clip": 0.0}, "b_clip"),
    ("dss", {"norm_len": 0}, "norm_len"),
    ("s5", {"kernel": "parallel"}, "linear_recurrence"),
    ("s5", {"discretization": "foh"}, "discretization"),
    ("h3", {"head_dim": 5}, "head_dim"),
    ("hyena", {"order": 1}, "order"),
    ("hyena", {"filter_pos_dim": 4}, "filter_pos_dim"),
])
def test_bad_options(name, options, needle):
  with pytest.raises(ValueError, match=needle):
    mixers.build(name, D, rngs=nnx.Rngs(0), **options)


def test_bilinear_dplr_matches_dense_solve():
  from layers.kernels.ssm import bilinear_dplr
  r = rng(3)
  H, N = 3, 8
  Lam = -np.exp(r.standard_normal((H, N))) + 1j * r.standard_normal((H, N))
  P, Bv = cnormal(r, (H, N)), cnormal(r, (H, N))
  dt = np.exp(r.uniform(np.log(1e-3), np.log(0.5), H))
  Abar_ref, Bbar_ref = bilinear_np(dplr_np(Lam, P), Bv, dt)
  c64 = lambda a: jnp.asarray(a, jnp.complex64)
  Abar, Bbar = bilinear_dplr(jnp.asarray(dt, jnp.float32), c64(Lam), c64(P), c64(Bv))
  assert rel(Abar, Abar_ref) < 1e-5 and rel(Bbar, Bbar_ref) < 1e-5


TWO_S4_LAYERS = """
import jax
from flax import nnx
from arches.lm import LMConfig, DecoderLM, cross_entropy
cfg = LMConfig(d_model=64, n_layers=2, mixer={"name": "s4", "dplr_kernel": "cauchy"})
graphdef, params, rest = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
tokens = jax.random.randint(jax.random.key(0), (16, 65), 0, 256)
loss = lambda p: cross_entropy(nnx.merge(graphdef, p, rest)(tokens[:, :-1]), tokens[:, 1:])
jax.block_until_ready(jax.jit(jax.grad(loss))(params))
print("done")
"""


def test_two_s4_layers_train_step_does_not_deadlock():
  # Two layers' kernels are independent, so XLA runs them concurrently. When
  # each discretized with a batched LAPACK solve, jaxlib 0.10.2's CPU
  # runtime deadlocked on a 2-thread pool (both pool threads waiting inside
  # getrf for work only they could run); bilinear_dplr has no LAPACK call.
  # A fresh process with default XLA threads, so a hang is a failure here.
  from fresh_process import run_python
  proc = run_python(TWO_S4_LAYERS, timeout=240)
  assert proc.returncode == 0 and "done" in proc.stdout, (
      proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
