"""Linear attention (Katharopoulos et al., 2020). The family's shared base
is `layers.blocks.linear`; the compute core, causal linear attention in
parallel, chunked and recurrent forms, is `layers.kernels.linear_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.blocks.attention import resolve_heads
from layers.blocks.linear import FeatureAttention
from layers.mixers import register
from layers.mixers.base import MixerInfo


@register("linear_attention")
class LinearAttention(FeatureAttention):
  """Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs:
  Fast Autoregressive Transformers with Linear Attention", arXiv:2006.16236).

  phi(x) = elu(x) + 1 replaces exp(q.k) in softmax attention:
  o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t), S_t = sum_{s<=t} phi(k_s) v_s^T,
  z_t = sum_{s<=t} phi(k_s): the output is normalized by the running sum
  of keys.

  Cost: training O(L C d) time with the chunked form (chunk C), O(L^2 d)
  with `kernel="parallel"`; decode O(1) per token with a constant fp32 state
  of num_heads * head_dim * (head_dim + 1) values.

  Options: num_heads, head_dim (default d_model // num_heads); kernel: the
  full-sequence form, "auto" or one of "chunked", "parallel", "recurrent"
  (all agree; see `layers.kernels.linear_attention`); chunk_size of the
  chunked form.
  """

  info = MixerInfo(family="linear attention", paper="Katharopoulos et al. "
                   "2020, arXiv:2006.16236", train_cost="linear",
                   decode_state="constant", supports_segments=True,
                   tensor_parallel=True, sequence_parallel=True)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_heads: int = 4,
               head_dim: int | None = None, kernel: str = "auto",
               chunk_size: int = 64):
    _, head_dim = resolve_heads(d_model, num_heads, None, head_dim)
    super().__init__(d_model, rngs=rngs, num_heads=num_heads, key_dim=head_dim,
                     head_dim=head_dim, kernel=kernel, chunk_size=chunk_size)
    self.feature_dim = head_dim

  def mix(self, x, pos, segment_ids, state):
    phi = lambda z: jax.nn.elu(z.astype(jnp.float32)) + 1.0
    o, state = self.attend(phi(self.q(x)), phi(self.k(x)), self.v(x),
                           segment_ids, state)
    return self.o(o), state
