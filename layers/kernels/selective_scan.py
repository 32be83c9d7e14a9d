"""Selective state-space scans (Mamba's S6 and Mamba-2's SSD), pure JAX.

SELECTIVE_SCAN (Gu & Dao 2023): per channel d and state index n,
    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n]
  "sequential": `lax.scan` over time, one [B, D, N] state.
  "chunked":   `lax.scan` over chunks of T positions; inside a chunk an
               associative scan over [B, T, D, N], then the output
               contraction. The chunk body is rematerialized in the
               backward pass, so the expanded state is only ever held for
               one chunk (what the fused CUDA kernel does in SRAM).

SSD (Dao & Gu 2024): the same recurrence with one scalar decay per head,
    h_t[h] = exp(dt_t[h] A[h]) h_{t-1}[h] + dt_t[h] x_t[h] (x) B_t[g(h)]
    y_t[h] = h_t[h] C_t[g(h)],    state [H, P, N], g(h) = h // (H / G)
  "sequential": `lax.scan` over time.
  "chunked":   the SSD matrix form: inside a chunk a masked quadratic
               (C B^T * decay) x product, plus one state per chunk passed
               between chunks by a short scan.

Both ops take an initial state h0 (None = zeros) and reset_BxL (True
where the state is zeroed before that step, for packed segments; None =
never), and return (y, final state). All arithmetic is fp32 whatever the
input dtype (decays and states drift in bf16); y and the state come back
fp32. The chunked forms pad the tail with dt = 0, which leaves the state
unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from layers.kernels import Impl, Op

F32 = jnp.float32


def _jit(fn):
  """Compiled once per shape, so eager (unjitted) mixer calls do not
  dispatch the scans op by op; inlined under an outer jit."""
  return jax.jit(fn, static_argnames=("chunk_size",))


def _f32(*arrays):
  return [a.astype(F32) for a in arrays]


def _resets(reset_BxL, B, L):
  return jnp.zeros((B, L), bool) if reset_BxL is None else reset_BxL


def _pad_time(T, *arrays):
  """Zero-pad axis 1 of each array to a multiple of T."""
  L = arrays[0].shape[1]
  pad = -L % T
  return [jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
          for a in arrays]


def _chunks(T, a):
  """[B, L, ...] (L a multiple of T) -> [B, L/T, T, ...]."""
  return a.reshape(a.shape[0], -1, T, *a.shape[2:])


# -- Mamba (S6) ---------------------------------------------------------------

def s6_sequential(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN, *, h0=None,
                  reset_BxL=None, chunk_size=None):
  """The recurrence, one step at a time (chunk_size is not used)."""
  del chunk_size
  Bsz, L, D = x_BxLxD.shape
  x, dt, A, Bm, Cm = _f32(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN)
  h0 = jnp.zeros((Bsz, D, A.shape[1]), F32) if h0 is None else h0.astype(F32)

  def step(h_BxDxN, inp):
    x_t, dt_t, B_t, C_t, r_t = inp
    h = jnp.where(r_t[:, None, None], 0.0, h_BxDxN)
    h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * x_t)[..., None] * B_t[:, None]
    return h, jnp.einsum("bdn,bn->bd", h, C_t)

  time_major = [jnp.swapaxes(a, 0, 1) for a in
                (x, dt, Bm, Cm, _resets(reset_BxL, Bsz, L))]
  h, y_LxBxD = jax.lax.scan(step, h0, time_major)
  return jnp.swapaxes(y_LxBxD, 0, 1), h


def _combine(left, right):
  """Compose h -> a1 h + b1 then h -> a2 h + b2."""
  a1, b1 = left
  a2, b2 = right
  return a2 * a1, a2 * b1 + b2


def s6_chunked(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN, *, h0=None,
               reset_BxL=None, chunk_size=64):
  """Associative scan within chunks of `chunk_size`, carried across."""
  Bsz, L, D = x_BxLxD.shape
  T = min(chunk_size, L)
  x, dt, A, Bm, Cm = _f32(x_BxLxD, dt_BxLxD, A_DxN, B_BxLxN, C_BxLxN)
  h0 = jnp.zeros((Bsz, D, A.shape[1]), F32) if h0 is None else h0.astype(F32)
  padded = _pad_time(T, x, dt, Bm, Cm, _resets(reset_BxL, Bsz, L))
  chunk_major = [jnp.swapaxes(_chunks(T, a), 0, 1) for a in padded]

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk(h_BxDxN, inp):
    x_c, dt_c, B_c, C_c, r_c = inp                          # [B, T, ...]
    a_BxTxDxN = jnp.where(r_c[..., None, None], 0.0,
                          jnp.exp(dt_c[..., None] * A))
    b_BxTxDxN = (dt_c * x_c)[..., None] * B_c[:, :, None]
    a_cum, h_local = jax.lax.associative_scan(_combine, (a_BxTxDxN, b_BxTxDxN),
                                              axis=1)
    h_all = a_cum * h_BxDxN[:, None] + h_local
    return h_all[:, -1], jnp.einsum("btdn,btn->btd", h_all, C_c)

  h, y_CxBxTxD = jax.lax.scan(chunk, h0, chunk_major)
  y = jnp.swapaxes(y_CxBxTxD, 0, 1).reshape(Bsz, -1, D)
  return y[:, :L], h


SELECTIVE_SCAN = Op(
    "selective_scan",
    impls={"chunked": Impl("chunked", _jit(s6_chunked)),
           "sequential": Impl("sequential", _jit(s6_sequential))},
    # On CPU the plain scan is the faster one (about 3x for fwd+bwd at
    # d_inner=256, L=512): the associative scan and its recompute only pay
    # off where the steps would otherwise run serially on a wide device.
    order={"cpu": ("sequential", "chunked"),
           "default": ("chunked", "sequential")},
)


def s6_flops_per_token(form: str, d_inner: int, d_state: int) -> float:
  """Forward FLOPs per token of one selective scan over [D, N] elements.

  sequential: discretize (dt*A, dt*x*B: 3), update (a*h + b: 2) and read
  out (C.h: 2) each element. chunked: the same, but the associative scan
  does about two combines (3 each) per element instead of one update, and
  the carried state is applied afterwards (2).
  """
  per_element = {"sequential": 7.0, "chunked": 13.0}
  return per_element[form] * d_inner * d_state


# -- Mamba-2 (SSD) ------------------------------------------------------------

def _heads_by_group(a, G):
  """[B, L, H, ...] -> [B, L, G, H/G, ...]: head h uses group h // (H/G)."""
  return a.reshape(a.shape[0], a.shape[1], G, -1, *a.shape[3:])


def ssd_sequential(x_BxLxHxP, dt_BxLxH, A_H, B_BxLxGxN, C_BxLxGxN, *, h0=None,
                   reset_BxL=None, chunk_size=None):
  """The recurrence, one step at a time (chunk_size is not used)."""
  del chunk_size
  Bsz, L, H, P = x_BxLxHxP.shape
  G, N = B_BxLxGxN.shape[2:]
  x, dt, A, Bm, Cm = _f32(x_BxLxHxP, dt_BxLxH, A_H, B_BxLxGxN, C_BxLxGxN)
  h0 = jnp.zeros((Bsz, H, P, N), F32) if h0 is None else h0.astype(F32)
  x, dt = _heads_by_group(x, G), _heads_by_group(dt, G)
  A = A.reshape(G, -1)

  def step(h_BxGxRxPxN, inp):
    x_t, dt_t, B_t, C_t, r_t = inp          # [B,G,R,P] [B,G,R] [B,G,N] [B]
    h = jnp.where(r_t[:, None, None, None, None], 0.0, h_BxGxRxPxN)
    decay = jnp.exp(dt_t * A)[..., None, None]
    h = decay * h + jnp.einsum("bgrp,bgn->bgrpn", x_t * dt_t[..., None], B_t)
    return h, jnp.einsum("bgrpn,bgn->bgrp", h, C_t)

  time_major = [jnp.swapaxes(a, 0, 1) for a in
                (x, dt, Bm, Cm, _resets(reset_BxL, Bsz, L))]
  h, y = jax.lax.scan(step, h0.reshape(Bsz, G, -1, P, N), time_major)
  return jnp.swapaxes(y, 0, 1).reshape(Bsz, L, H, P), h.reshape(Bsz, H, P, N)


def _segsum(a_xT):
  """S[..., i, j] = sum_{j<k<=i} a[..., k] (valid for i >= j), by a masked
  cumsum rather than a difference of cumsums, which loses precision."""
  T = a_xT.shape[-1]
  strict = jnp.tril(jnp.ones((T, T), bool), -1)
  return jnp.cumsum(jnp.where(strict, a_xT[..., :, None], 0.0), axis=-2)


def ssd_chunked(x_BxLxHxP, dt_BxLxH, A_H, B_BxLxGxN, C_BxLxGxN, *, h0=None,
                reset_BxL=None, chunk_size=64):
  """The SSD chunked matrix form (Dao & Gu 2024, sec. 6)."""
  Bsz, L, H, P = x_BxLxHxP.shape
  G, N = B_BxLxGxN.shape[2:]
  T = min(chunk_size, L)
  x, dt, A, Bm, Cm = _f32(x_BxLxHxP, dt_BxLxH, A_H, B_BxLxGxN, C_BxLxGxN)
  h0 = jnp.zeros((Bsz, H, P, N), F32) if h0 is None else h0.astype(F32)
  # Run index: positions i >= j share a run iff no reset lies in (j, i].
  runs_BxL = jnp.cumsum(_resets(reset_BxL, Bsz, L).astype(jnp.int32), axis=1)
  x, dt, Bm, Cm = _pad_time(T, x, dt, Bm, Cm)
  runs_BxL = jnp.pad(runs_BxL, [(0, 0), (0, x.shape[1] - L)], mode="edge")
  xdt = _chunks(T, _heads_by_group(x * dt[..., None], G))    # [B,C,T,G,R,P]
  a = jnp.moveaxis(_chunks(T, _heads_by_group(dt * A, G)), 2, -1)  # [B,C,G,R,T]
  Bm, Cm, runs = _chunks(T, Bm), _chunks(T, Cm), _chunks(T, runs_BxL)
  runs_before = jnp.concatenate(                               # [B, C]
      [jnp.zeros_like(runs[:, :1, 0]), runs[:, :-1, -1]], axis=1)

  # Decay between positions of one chunk: L[i, j] = exp(a_{j+1} + ... + a_i).
  causal = jnp.tril(jnp.ones((T, T), bool))
  same = (runs[..., :, None] == runs[..., None, :]) & causal     # [B,C,T,T]
  decay_TxT = jnp.exp(jnp.where(same[:, :, None, None], _segsum(a), -jnp.inf))
  # Decay from the chunk's incoming state to each position.
  from_start = jnp.where((runs == runs_before[..., None])[:, :, None, None],
                         jnp.exp(jnp.cumsum(a, -1)), 0.0)        # [B,C,G,R,T]

  scores = jnp.einsum("bcign,bcjgn->bcgij", Cm, Bm)
  y_diag = jnp.einsum("bcgij,bcgrij,bcjgrp->bcigrp", scores, decay_TxT, xdt)
  # Each chunk's own contribution to the state at its end.
  states = jnp.einsum("bcgrj,bcjgn,bcjgrp->bcgrpn", decay_TxT[..., -1, :],
                      Bm, xdt)

  def carry(h_BxGxRxPxN, inp):
    decay_BxGxR, state = inp
    return decay_BxGxR[..., None, None] * h_BxGxRxPxN + state, h_BxGxRxPxN

  h, h_in = jax.lax.scan(
      carry, h0.reshape(Bsz, G, -1, P, N),
      (jnp.moveaxis(from_start[..., -1], 1, 0), jnp.moveaxis(states, 1, 0)))
  y_off = jnp.einsum("bcign,cbgrpn,bcgri->bcigrp", Cm, h_in, from_start)
  y = (y_diag + y_off).reshape(Bsz, -1, H, P)
  return y[:, :L], h.reshape(Bsz, H, P, N)


SSD = Op(
    "ssd",
    impls={"chunked": Impl("chunked", _jit(ssd_chunked)),
           "sequential": Impl("sequential", _jit(ssd_sequential))},
    order={"default": ("chunked", "sequential")},
)


def ssd_flops_per_token(form: str, heads: int, head_dim: int, d_state: int,
                        groups: int, chunk: int) -> float:
  """Forward FLOPs per token of one SSD call.

  sequential: per head, the state update (decay, x (x) B: 3 per element)
  and read-out (2 per element) of the [P, N] state.
  chunked (chunk T): C.B scores over the full T x T block per group
  (2TN), the decay mask and weighted sum of values per head (T + 2TP),
  chunk states and the read-out of the incoming state (2PN each), and the
  state passing (2PN per chunk).
  """
  H, P, N, G, T = heads, head_dim, d_state, groups, chunk
  per_form = {
      "sequential": lambda: 5.0 * H * P * N,
      "chunked": lambda: (2.0 * G * T * N + H * (T + 2.0 * T * P)
                          + 4.0 * H * P * N + 2.0 * H * P * N / T),
  }
  return per_form[form]()
