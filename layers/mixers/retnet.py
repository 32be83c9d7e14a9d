"""RetNet multi-scale retention."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from layers.blocks.attention import build_position, resolve_heads
from layers.blocks.linear import LinearMixer
from layers.blocks.recurrent import GatedHeadNorm
from layers.mixers import register
from layers.mixers.base import MixerInfo

# RetNet's xPos: the rotation only; the retention decay plays xPos's scale.
XPOS_ROTATION = {"name": "xpos", "scale_base": None}


def retention_log_decay(num_heads: int) -> jnp.ndarray:
  """log gamma_h, gamma_h = 1 - 2^(-5 - h): one time scale per head."""
  return jnp.log1p(-2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32)))


@register("retnet")
class RetNet(LinearMixer):
  """Multi-scale retention (Sun et al., 2023, "Retentive Network: A
  Successor to Transformer for Large Language Models", arXiv:2307.08621).

  Per head h with decay gamma_h = 1 - 2^(-5 - h):
  retention(X) = (Q K^T * D) V, D_nm = gamma^(n - m) for n >= m, with Q, K
  rotated by xPos (`layers.positions.XPos`, rotation only by default) and
  K scaled by head_dim^-1/2; recurrently S_n = gamma S_{n-1} + k_n v_n^T,
  o_n = S_n^T q_n. Output: W_O (swish(X W_G) * GroupNorm_heads(retention)).
  Parallel, chunkwise and recurrent forms (`kernel`) give the same outputs.

  Cost: training O(L C d) time with the chunkwise form (chunk C), O(L^2 d)
  with `kernel="parallel"`; decode O(1) per token with a constant fp32 state
  of num_heads * head_dim^2 values. (The paper's value heads are 2x wider;
  here q, k and v share head_dim.)

  Options: num_heads, head_dim; position (a scheme name or {"name": ...,
  **opts}); kernel ("auto", "chunked", "parallel", "recurrent", or a Pallas kernel on TPU/GPU); chunk_size.
  """

  info = MixerInfo(family="linear attention", paper="Sun et al. 2023, "
                   "arXiv:2307.08621", train_cost="linear",
                   decode_state="constant", supports_segments=True,
                   tensor_parallel=True, sequence_parallel=True)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_heads: int = 4,
               head_dim: int | None = None,
               position: str | dict = XPOS_ROTATION, kernel: str = "auto",
               chunk_size: int = 64):
    _, head_dim = resolve_heads(d_model, num_heads, None, head_dim)
    super().__init__(d_model, rngs=rngs, num_heads=num_heads, key_dim=head_dim,
                     head_dim=head_dim, kernel=kernel, chunk_size=chunk_size)
    self.out_gate = GatedHeadNorm(d_model, num_heads, head_dim, rngs=rngs,
                                  use_bias=False)
    self.position = build_position(position, head_dim, num_heads)

  def mix(self, x, pos, segment_ids, state):
    B, L, _ = x.shape
    q = self.position.queries(self.q(x), pos)
    k = self.position.keys(self.k(x), pos) * self.head_dim ** -0.5
    log_decay = jnp.broadcast_to(retention_log_decay(self.num_heads)[:, None],
                                 (B, L, self.num_heads, 1))
    o, state = self.attend(q, k, self.v(x), segment_ids, state, log_decay)
    return self.o(self.out_gate(x, o)), state

  def flops_per_token(self, seq_len):
    return (self.projection_flops() + self.out_gate.flops_per_token()
            + self.kernel_flops(seq_len, self.head_dim, self.head_dim))
