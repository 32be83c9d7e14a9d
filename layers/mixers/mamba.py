"""Mamba (selective SSM, S6) and Mamba-2 (SSD) mixers.

Both follow the same block: project up to an inner width, a short causal
depthwise conv + SiLU, an input-dependent (selective) linear recurrence
(`layers.kernels.selective_scan` for Mamba; decayed linear attention,
`layers.kernels.linear_attention`, for Mamba-2), a D skip, a SiLU gate,
and a projection back down. Parameter names follow the reference code
(state-spaces/mamba), so `arches.hf_mamba` maps checkpoints one to one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.blocks.conv import ShortConv
from layers.kernels import linear_attention as la
from layers.kernels.selective_scan import SELECTIVE_SCAN, s6_flops_per_token
from layers.mixers import register
from layers.mixers.base import Mixer, MixerInfo
from layers.norms import RMSNorm
from layers.params import Dense, constant_init, param
from layers.positions import segment_starts

F32 = jnp.float32


@struct.dataclass
class SSMCache:
  """Decode state of a Mamba-style mixer; its size does not depend on the
  number of tokens seen.

  conv: [B, d_conv - 1, channels], the last conv inputs (compute dtype).
  ssm: the recurrent state, fp32 ([B, d_inner, d_state] for Mamba,
    [B, heads, d_state, head_dim] for Mamba-2).
  """
  conv: jax.Array
  ssm: jax.Array


def check_options(who: str, **ints) -> None:
  """Every named option must be an int >= 1."""
  for name, value in ints.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{who}: {name} must be an int >= 1, got {value!r}")


def dt_bias_init(dt_min: float, dt_max: float, floor: float = 1e-4):
  """softplus^-1 of dt ~ log-uniform in [dt_min, dt_max] (at least
  `floor`), the reference init: softplus(bias) starts as a spread of step
  sizes, i.e. of memory lengths."""
  if not 0 < dt_min <= dt_max:
    raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, "
                     f"dt_max={dt_max}")

  def init(key, shape, dtype):
    u = jax.random.uniform(key, shape, F32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def conv_silu(conv: ShortConv, x, state, segment_ids):
  """SiLU(causal short conv(x)) and the conv's new state."""
  y, state = conv(x, state, segment_ids)
  return jax.nn.silu(y), state


def dense_flops(*modules: Dense) -> float:
  return 2.0 * sum(m.kernel.size for m in modules)


@register("mamba")
class Mamba(Mixer):
  """Mamba: selective state space model, S6 (Gu & Dao, 2023, "Mamba:
  Linear-Time Sequence Modeling with Selective State Spaces",
  arXiv:2312.00752).

  (x, z) = in_proj(u); x = SiLU(causal_conv(x)); (dt_r, B, C) = x_proj(x);
  dt = softplus(dt_proj(dt_r) + dt_bias); A = -exp(A_log) (S4D-real init
  A[d, n] = -(n + 1)); per channel d and state n
      h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,   y_t = C_t h_t + D x_t,
  out = out_proj(y * SiLU(z)).

  Cost: training O(L d_inner d_state) time (a sequential or chunked scan,
  see `layers.kernels.selective_scan`); decode O(1) per token with a constant
  state of d_inner * d_state (fp32) + (d_conv - 1) * d_inner values.
  Packed segments reset both the conv taps and the scan state.

  Options: expand (d_inner = expand * d_model), d_state, d_conv, dt_rank
  (default ceil(d_model / 16)), chunk_size (of the chunked scan), kernel
  ("auto" or a SELECTIVE_SCAN form), use_bias (in/out projections),
  conv_bias, dt_min/dt_max (range of the initial step sizes), bcdt_norm:
  RMSNorms (eps bcdt_norm_eps) on dt_r, B and C right after x_proj, as
  Jamba's Mamba layers have (Lieber et al. 2024, arXiv:2403.19887).
  """

  info = MixerInfo(family="ssm", paper="Gu & Dao 2023, arXiv:2312.00752",
                   train_cost="linear", decode_state="constant",
                   supports_segments=True)
  kernel_ops = {"kernel": SELECTIVE_SCAN}

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, expand: int = 2,
               d_state: int = 16, d_conv: int = 4, dt_rank: int | None = None,
               chunk_size: int = 64, kernel: str = "auto",
               use_bias: bool = False, conv_bias: bool = True,
               dt_min: float = 1e-3, dt_max: float = 0.1,
               bcdt_norm: bool = False, bcdt_norm_eps: float = 1e-6):
    dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
    check_options("mamba", expand=expand, d_state=d_state, d_conv=d_conv,
                  dt_rank=dt_rank, chunk_size=chunk_size)
    d_inner = expand * d_model
    self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
    self.chunk_size, self.kernel = chunk_size, kernel
    self.in_proj = Dense(d_model, (2, d_inner), in_axes=("embed",),
                         out_axes=(None, "mlp"), rngs=rngs, use_bias=use_bias)
    self.conv = ShortConv(d_inner, d_conv, rngs=rngs, axes=("mlp",),
                          use_bias=conv_bias)
    self.x_proj = Dense(d_inner, dt_rank + 2 * d_state, in_axes=("mlp",),
                        out_axes=(None,), rngs=rngs)
    # The reference draws dt_proj uniform in +-dt_rank^-0.5; 1/sqrt(3)
    # gives the truncated normal the same std.
    self.dt_proj = Dense(dt_rank, d_inner, in_axes=(None,), out_axes=("mlp",),
                         rngs=rngs, init_scale=3 ** -0.5)
    self.dt_bias = param(rngs, dt_bias_init(dt_min, dt_max), (d_inner,),
                         ("mlp",))
    s4d_real = jnp.log(jnp.broadcast_to(
        jnp.arange(1, d_state + 1, dtype=F32), (d_inner, d_state)))
    # A_log and D carry _no_weight_decay in the reference.
    self.A_log = param(rngs, s4d_real, (d_inner, d_state), ("mlp", "state"),
                       weight_decay=False)
    self.D = param(rngs, constant_init(1.0), (d_inner,), ("mlp",),
                   weight_decay=False)
    self.out_proj = Dense(d_inner, d_model, in_axes=("mlp",),
                          out_axes=("embed",), rngs=rngs, use_bias=use_bias)
    norm = lambda dim: RMSNorm(dim, rngs=rngs, eps=bcdt_norm_eps) if bcdt_norm else None
    self.dt_norm, self.b_norm, self.c_norm = norm(dt_rank), norm(d_state), norm(d_state)

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    xz_BxLx2xI = self.in_proj(x)
    u, conv_state = conv_silu(self.conv, xz_BxLx2xI[:, :, 0],
                              None if cache is None else cache.conv, segment_ids)
    R, N = self.dt_rank, self.d_state
    dbc = self.x_proj(u)
    dt_r, B, C = dbc[..., :R], dbc[..., R:R + N], dbc[..., R + N:]
    if self.dt_norm is not None:
      dt_r, B, C = self.dt_norm(dt_r), self.b_norm(B), self.c_norm(C)
    dt = jax.nn.softplus(self.dt_proj(dt_r).astype(F32) + self.dt_bias[...])
    scan = SELECTIVE_SCAN.choose(self.kernel, dtype=u.dtype, d_state=N)
    y, h = scan.fn(u, dt, -jnp.exp(self.A_log[...]), B, C,
                   h0=None if cache is None else cache.ssm,
                   reset_BxL=(None if segment_ids is None
                              else segment_starts(segment_ids)), chunk_size=self.chunk_size)
    y = (y + u.astype(F32) * self.D[...]) * jax.nn.silu(
        xz_BxLx2xI[:, :, 1].astype(F32))
    out = self.out_proj(y.astype(x.dtype))
    return out if cache is None else (out, SSMCache(conv_state, h))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    del max_len  # the state does not grow with length
    return SSMCache(self.conv.init_state(batch_size, dtype),
                    jnp.zeros((batch_size, self.d_inner, self.d_state), F32))

  def flops_per_token(self, seq_len):
    form = SELECTIVE_SCAN.choose(self.kernel, dtype=F32, d_state=self.d_state).name
    return (dense_flops(self.in_proj, self.x_proj, self.dt_proj, self.out_proj)
            + self.conv.flops_per_token()
            + s6_flops_per_token(form, self.d_inner, self.d_state))


def ssd(x_BxLxHxP, dt_BxLxH, A_H, B_BxLxGxN, C_BxLxGxN, *, state, segment_ids,
        kernel: str, chunk_size: int):
  """Mamba-2's scan as what SSD shows it to be: causal linear attention
  with a scalar log decay dt*A per head and step, queries C, keys B (each
  head reads its group's, head h -> group h // (H/G)) and values dt*x.
  Returns y [B, L, H, P] and the state [B, H, N, P], both fp32."""
  per_head = lambda a: jnp.repeat(a, x_BxLxHxP.shape[2] // a.shape[2], axis=2)
  return la.causal_linear_attention(
      per_head(C_BxLxGxN), per_head(B_BxLxGxN),
      x_BxLxHxP.astype(F32) * dt_BxLxH[..., None],
      log_decay=(dt_BxLxH * A_H)[..., None], segment_ids=segment_ids,
      state=state, form=kernel, chunk_size=chunk_size)


class GatedRMSNorm(nnx.Module):
  """Mamba-2's output norm: RMSNorm(y * SiLU(z)) * weight, with the
  statistics taken per group of d_inner / groups channels (fp32)."""

  def __init__(self, dim: int, groups: int, *, rngs: nnx.Rngs, eps: float):
    self.groups, self.eps = groups, eps
    self.weight = param(rngs, constant_init(1.0), (dim,), ("mlp",))

  def __call__(self, y_BxLxI, z_BxLxI):
    g = y_BxLxI.astype(F32) * jax.nn.silu(z_BxLxI.astype(F32))
    g = g.reshape(*g.shape[:-1], self.groups, -1)
    g = g * jax.lax.rsqrt(jnp.mean(g * g, -1, keepdims=True) + self.eps)
    return g.reshape(y_BxLxI.shape) * self.weight[...]


@register("mamba2")
class Mamba2(Mixer):
  """Mamba-2: state space duality, SSD (Dao & Gu, 2024, "Transformers are
  SSMs: Generalized Models and Efficient Algorithms Through Structured
  State Space Duality", arXiv:2405.21060).

  (z, x, B, C, dt) = in_proj(u); (x, B, C) = SiLU(causal_conv(x, B, C));
  dt = softplus(dt + dt_bias); A = -exp(A_log), one scalar per head; per
  head h (head_dim P, B/C shared by the heads of a group)
      h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D x_t,
  out = out_proj(RMSNorm_grouped(y * SiLU(z))).

  The scan is decayed causal linear attention (q = C, k = B, v = dt x,
  log decay dt A), run by `layers.kernels.linear_attention`.

  Cost: training O(L T heads (d_state + head_dim) + L d_inner d_state)
  time with chunk T (the SSD chunked form: quadratic inside a chunk, a
  state passed between chunks); decode O(1) per token with a constant
  state of d_inner * d_state (fp32) + (d_conv - 1) * (d_inner + 2 n_groups
  d_state) values. Packed segments reset the conv and the scan.

  Options: expand, d_state, head_dim (heads = expand * d_model /
  head_dim), n_groups (of B/C and of the output norm), d_conv, kernel
  ("auto", "chunked", "parallel", "recurrent", or a Pallas kernel on TPU/GPU) and chunk_size of the scan,
  use_bias, conv_bias, dt_min/dt_max, norm_eps.
  """

  info = MixerInfo(family="ssm", paper="Dao & Gu 2024, arXiv:2405.21060",
                   train_cost="linear", decode_state="constant",
                   supports_segments=True,
                   tensor_parallel=True)
  kernel_ops = {"kernel": la.LINEAR_ATTENTION}

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, expand: int = 2,
               d_state: int = 128, head_dim: int = 64, n_groups: int = 1,
               d_conv: int = 4, kernel: str = "auto", chunk_size: int = 256,
               use_bias: bool = False, conv_bias: bool = True,
               dt_min: float = 1e-3, dt_max: float = 0.1,
               norm_eps: float = 1e-5):
    check_options("mamba2", expand=expand, d_state=d_state, head_dim=head_dim,
                  n_groups=n_groups, d_conv=d_conv, chunk_size=chunk_size)
    d_inner = expand * d_model
    if d_inner % head_dim:
      raise ValueError(f"mamba2: d_inner = expand * d_model = {d_inner} is not "
                       f"a multiple of head_dim={head_dim}")
    heads = d_inner // head_dim
    if heads % n_groups:
      raise ValueError(f"mamba2: heads = {heads} is not a multiple of "
                       f"n_groups={n_groups}")
    self.d_inner, self.d_state, self.heads = d_inner, d_state, heads
    self.head_dim, self.n_groups = head_dim, n_groups
    self.chunk_size, self.kernel = chunk_size, kernel
    bc = 2 * n_groups * d_state
    self.in_proj = Dense(d_model, (2, d_inner), in_axes=("embed",),
                         out_axes=(None, "mlp"), rngs=rngs, use_bias=use_bias)
    self.bcdt_proj = Dense(d_model, bc + heads, in_axes=("embed",),
                           out_axes=(None,), rngs=rngs, use_bias=use_bias)
    self.conv = ShortConv(d_inner + bc, d_conv, rngs=rngs, axes=(None,),
                          use_bias=conv_bias)
    self.dt_bias = param(rngs, dt_bias_init(dt_min, dt_max), (heads,),
                         ("heads",))
    # Reference init: A uniform in [1, 16] per head.
    self.A_log = param(rngs, lambda key, shape, dtype: jnp.log(
        jax.random.uniform(key, shape, dtype, 1.0, 16.0)), (heads,), ("heads",),
        weight_decay=False)
    self.D = param(rngs, constant_init(1.0), (heads,), ("heads",),
                   weight_decay=False)
    self.norm = GatedRMSNorm(d_inner, n_groups, rngs=rngs, eps=norm_eps)
    self.out_proj = Dense(d_inner, d_model, in_axes=("mlp",),
                          out_axes=("embed",), rngs=rngs, use_bias=use_bias)

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    Bsz, L, _ = x.shape
    I, H, P, G, N = (self.d_inner, self.heads, self.head_dim, self.n_groups,
                     self.d_state)
    xz_BxLx2xI = self.in_proj(x)
    bcdt = self.bcdt_proj(x)
    xbc, conv_state = conv_silu(self.conv,
        jnp.concatenate([xz_BxLx2xI[:, :, 0], bcdt[..., :2 * G * N]], -1),
        None if cache is None else cache.conv, segment_ids)
    xs_BxLxHxP = xbc[..., :I].reshape(Bsz, L, H, P)
    dt = jax.nn.softplus(bcdt[..., 2 * G * N:].astype(F32) + self.dt_bias[...])
    y, h = ssd(xs_BxLxHxP, dt, -jnp.exp(self.A_log[...]),
               xbc[..., I:I + G * N].reshape(Bsz, L, G, N),
               xbc[..., I + G * N:].reshape(Bsz, L, G, N),
               state=None if cache is None else cache.ssm,
               segment_ids=segment_ids, kernel=self.kernel,
               chunk_size=self.chunk_size)
    y = y + xs_BxLxHxP.astype(F32) * self.D[...][:, None]
    y = self.norm(y.reshape(Bsz, L, I), xz_BxLx2xI[:, :, 1])
    out = self.out_proj(y.astype(x.dtype))
    return out if cache is None else (out, SSMCache(conv_state, h))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    del max_len  # the state does not grow with length
    return SSMCache(self.conv.init_state(batch_size, dtype),
                    jnp.zeros((batch_size, self.heads, self.d_state,
                               self.head_dim), F32))

  def flops_per_token(self, seq_len):
    return (dense_flops(self.in_proj, self.bcdt_proj, self.out_proj)
            + self.conv.flops_per_token()
            + self.heads * la.flops_per_token(
                la.LINEAR_ATTENTION.choose(self.kernel).name, seq_len,
                self.chunk_size, self.d_state, self.head_dim))
