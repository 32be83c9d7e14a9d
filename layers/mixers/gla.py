"""Gated Linear Attention (GLA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.blocks.attention import resolve_heads
from layers.blocks.linear import LinearMixer
from layers.blocks.recurrent import GatedHeadNorm
from layers.mixers import register
from layers.mixers.base import MixerInfo
from layers.params import Dense


@register("gla")
class GLA(LinearMixer):
  """Gated Linear Attention (Yang et al., 2023, "Gated Linear Attention
  Transformers with Hardware-Efficient Training", arXiv:2312.06635).

  S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, with a
  data-dependent gate per key channel from a low-rank projection:
  alpha_t = sigmoid(x_t W_a1 W_a2 + b_a)^(1/tau), i.e. log alpha_t =
  log_sigmoid(.) / tau (tau = 16). Parallel: o_t = sum_{s<=t} (q_t *
  prod_{r=s+1..t} alpha_r) . k_s v_s. Output: W_O (swish(x W_r + b_r) *
  GroupNorm_heads(o)). The chunked form accumulates log alpha in fp32 and
  uses secondary chunks (see `layers.kernels.linear_attention`).

  Cost: training O(L C d) time with the chunked form (chunk C), O(L^2 d_k)
  memory with `kernel="parallel"`; decode O(1) per token with a constant fp32
  state of num_heads * key_dim * head_dim values.

  Options: num_heads; head_dim (value width per head, default d_model //
  num_heads); key_dim (per head, default head_dim // 2 as the paper's
  d_k = d / 2); gate_rank, gate_temperature (tau); kernel ("auto", "chunked",
  "parallel", "recurrent", or a Pallas kernel on TPU/GPU); chunk_size.
  """

  info = MixerInfo(family="linear attention", paper="Yang et al. 2023, "
                   "arXiv:2312.06635", train_cost="linear",
                   decode_state="constant", supports_segments=True,
                   tensor_parallel=True, sequence_parallel=True)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_heads: int = 4,
               head_dim: int | None = None, key_dim: int | None = None,
               gate_rank: int = 16, gate_temperature: float = 16.0,
               kernel: str = "auto", chunk_size: int = 64):
    _, head_dim = resolve_heads(d_model, num_heads, None, head_dim)
    key_dim = max(head_dim // 2, 1) if key_dim is None else key_dim
    super().__init__(d_model, rngs=rngs, num_heads=num_heads, key_dim=key_dim,
                     head_dim=head_dim, kernel=kernel, chunk_size=chunk_size)
    if gate_temperature <= 0:
      raise ValueError(f"gla: gate_temperature must be > 0, got {gate_temperature}")
    self.temperature = gate_temperature
    self.gate_down = Dense(d_model, gate_rank, in_axes=("embed",),
                           out_axes=(None,), rngs=rngs)
    self.gate_up = Dense(gate_rank, (num_heads, key_dim), in_axes=(None,),
                         out_axes=("heads", "head_dim"), rngs=rngs,
                         use_bias=True)
    self.out_gate = GatedHeadNorm(d_model, num_heads, head_dim, rngs=rngs,
                                  use_bias=True)

  def mix(self, x, pos, segment_ids, state):
    del pos  # order comes from the gates
    gate = self.gate_up(self.gate_down(x)).astype(jnp.float32)
    log_alpha = jax.nn.log_sigmoid(gate) / self.temperature  # [B, L, H, K]
    o, state = self.attend(self.q(x) * self.key_dim ** -0.5, self.k(x),
                           self.v(x), segment_ids, state, log_alpha)
    return self.o(self.out_gate(x, o)), state

  def flops_per_token(self, seq_len):
    gate = 2.0 * (self.gate_down.kernel.size + self.gate_up.kernel.size)
    return (self.projection_flops() + gate + self.out_gate.flops_per_token()
            + self.kernel_flops(seq_len, self.key_dim, self.head_dim))
