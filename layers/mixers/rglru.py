"""Griffin's recurrent block with the RG-LRU (De et al., 2024)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.blocks.conv import ShortConv
from layers.kernels.linear_recurrence import (LINEAR_RECURRENCE, RECURRENCE_FLOPS,
                                              linear_scan)
from layers.mixers import register
from layers.mixers.base import Mixer, MixerInfo, positions_for
from layers.params import Dense, constant_init, fan_in_init, param
from layers.positions import segment_positions

# a_t = a^(c r_t) with c = 8 (the paper's constant).
C_EXP = 8.0
# Bound on d sqrt(x)/dx near x = 0 (the reference clips it the same way, so
# that bf16 training does not produce inf/NaN when a_t -> 1).
MAX_SQRT_GRADIENT = 1000.0


@jax.custom_vjp
def sqrt_bounded_grad(x):
  return jnp.sqrt(x)


def _sqrt_fwd(x):
  return jnp.sqrt(x), x


def _sqrt_bwd(x, g):
  return (g / jnp.sqrt(jnp.maximum(4.0 * x, MAX_SQRT_GRADIENT ** -2)),)


sqrt_bounded_grad.defvjp(_sqrt_fwd, _sqrt_bwd)


def a_param_init(lo: float = 0.9, hi: float = 0.999):
  """a_param with the base decay a = sigma(-a_param) in [lo, hi] (a^2
  uniform in [lo^2, hi^2], as the reference implementation draws it)."""
  def init(key, shape, dtype):
    a2 = jax.random.uniform(key, shape, dtype, lo ** 2, hi ** 2)
    return jnp.log(jnp.expm1(-0.5 * jnp.log(a2)))
  return init


class BlockDiagonal(nnx.Module):
  """x W + b with W block-diagonal: one [K, K] block per head."""

  def __init__(self, num_heads: int, block: int, *, rngs: nnx.Rngs):
    self.w = param(rngs, fan_in_init(block, 0.1), (num_heads, block, block),
                   ("heads", None, "head_dim"))
    self.b = param(rngs, constant_init(0.0), (num_heads, block),
                   ("heads", "head_dim"))

  def __call__(self, x_BxLxW):
    H, K, _ = self.w.shape
    x = x_BxLxW.reshape(*x_BxLxW.shape[:-1], H, K)
    y = jnp.einsum("blhi,hij->blhj", x, self.w[...].astype(x.dtype))
    return (y + self.b[...].astype(x.dtype)).reshape(x_BxLxW.shape)


@struct.dataclass
class RGLRUCache:
  """conv: last conv_width-1 conv inputs [B, K-1, W]; h: RG-LRU state
  [B, W] fp32; pos: tokens seen (int32 scalar; position 0 resets)."""
  conv: jax.Array
  h: jax.Array
  pos: jax.Array


@register("rglru")
class RGLRU(Mixer):
  """Griffin's recurrent block with the Real-Gated Linear Recurrent Unit
  (De et al., 2024, "Griffin: Mixing Gated Linear Recurrences with Local
  Attention for Efficient Language Models", arXiv:2402.19427).

  Two branches of width W: gelu(W_y x), and W_x x -> causal depthwise
  conv1d (width 4) -> RG-LRU; their product goes through W_o. The RG-LRU,
  with block-diagonal gate projections (one block per head):

    r_t = sigma(W_a x_t + b_a),  i_t = sigma(W_x x_t + b_x)
    a_t = a^(c r_t),  a = sigma(-a_param)   (c = 8; log a_t = -c r_t softplus(a_param))
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)

  As in the reference implementation, the first token of a sequence (or
  of a segment of a packed row) resets the state and skips the sqrt(1 -
  a^2) normalization.

  Cost: training O(L W) time (associative scan, O(log L) depth); decode
  O(W) per token with a constant state of W fp32 values plus (conv_width -
  1) W conv inputs.

  Options: width (W, default d_model), num_heads (gate blocks), conv_width,
  kernel: "auto" or one of `LINEAR_RECURRENCE.names()`.
  """

  info = MixerInfo(family="rnn", paper="De et al. 2024, arXiv:2402.19427",
                   train_cost="linear", decode_state="constant",
                   supports_segments=True)
  kernel_ops = {"kernel": LINEAR_RECURRENCE}

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, width: int | None = None,
               num_heads: int = 4, conv_width: int = 4, kernel: str = "auto"):
    W = d_model if width is None else width
    if W < 1 or num_heads < 1 or W % num_heads:
      raise ValueError(f"rglru: width={W} must be a positive multiple of "
                       f"num_heads={num_heads}")
    if conv_width < 1:
      raise ValueError(f"rglru: conv_width must be >= 1, got {conv_width}")
    self.kernel = kernel
    dense = lambda i, o, ia, oa: Dense(i, o, in_axes=(ia,), out_axes=(oa,),
                                       rngs=rngs, use_bias=True)
    self.gate_proj = dense(d_model, W, "embed", "mlp")
    self.in_proj = dense(d_model, W, "embed", "mlp")
    self.conv = ShortConv(W, conv_width, rngs=rngs, axes=("mlp",), scale=0.1)
    self.input_gate = BlockDiagonal(num_heads, W // num_heads, rngs=rngs)
    self.a_gate = BlockDiagonal(num_heads, W // num_heads, rngs=rngs)
    self.a_param = param(rngs, a_param_init(), (W,), ("mlp",))
    self.out_proj = dense(W, d_model, "mlp", "embed")

  def rg_lru(self, x_BxLxW, reset_BxL, h0_BxW):
    """h_t for every t and the last state, fp32."""
    gate_i = jax.nn.sigmoid(self.input_gate(x_BxLxW)).astype(jnp.float32)
    gate_a = jax.nn.sigmoid(self.a_gate(x_BxLxW)).astype(jnp.float32)
    log_a = -C_EXP * gate_a * jax.nn.softplus(self.a_param[...])
    reset = reset_BxL[..., None]
    scale = jnp.where(reset, 1.0, sqrt_bounded_grad(1.0 - jnp.exp(2.0 * log_a)))
    b = x_BxLxW.astype(jnp.float32) * gate_i * scale
    a = jnp.where(reset, 0.0, jnp.exp(log_a))
    return linear_scan(a, b, h0_BxW, self.kernel)

  def __call__(self, x, *, cache: RGLRUCache | None = None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    B, L, _ = x.shape
    if segment_ids is not None:
      pos = segment_positions(segment_ids)
    else:
      pos = positions_for(x, 0 if cache is None else cache.pos)
    gate = jax.nn.gelu(self.gate_proj(x))  # tanh approximation, as Griffin
    u, conv = self.conv(self.in_proj(x), None if cache is None else cache.conv,
                        segment_ids)
    h0 = jnp.zeros((B, u.shape[-1]), jnp.float32) if cache is None else cache.h
    h, h_last = self.rg_lru(u, pos == 0, h0)
    y = self.out_proj(h.astype(x.dtype) * gate)
    if cache is None:
      return y
    return y, RGLRUCache(conv, h_last, cache.pos + L)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    return RGLRUCache(self.conv.init_state(batch_size, dtype),
                      jnp.zeros((batch_size, self.a_param.shape[0]), jnp.float32),
                      jnp.zeros((), jnp.int32))

  def flops_per_token(self, seq_len):
    W = self.a_param.shape[0]
    matmuls = sum(math.prod(m.kernel.shape) for m in
                  (self.gate_proj, self.in_proj, self.out_proj))
    gates = self.input_gate.w.size + self.a_gate.w.size
    impl = LINEAR_RECURRENCE.choose(self.kernel, dtype=jnp.float32)
    return (2.0 * (matmuls + gates) + self.conv.flops_per_token()
            + RECURRENCE_FLOPS[impl.name] * W)
