"""The linear-attention family's base: per-head q/k/v/o projections over
the shared causal linear attention (`layers.kernels.linear_attention`),
plain (`LinearMixer`) or normalized by the running key sum
(`FeatureAttention`). Used by linear_attention, performer, retnet, gla and
based."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from layers.blocks.recurrent import RecurrentMixer, head_dense
from layers.kernels import context_parallel
from layers.kernels import linear_attention as la
from layers.params import Dense


class LinearMixer(RecurrentMixer):
  """Per-head q, k [heads, key_dim], v [heads, head_dim] and the output
  projection, plus the `kernel` ("auto" or a LINEAR_ATTENTION form) and
  `chunk_size` options of the shared kernel."""

  kernel_ops = {"kernel": la.LINEAR_ATTENTION}

  def __init__(self, d_model, *, rngs, num_heads, key_dim, head_dim, kernel,
               chunk_size):
    if chunk_size < 1:
      raise ValueError(f"{type(self).__name__}: chunk_size must be >= 1, "
                       f"got {chunk_size}")
    self.num_heads, self.key_dim, self.head_dim = num_heads, key_dim, head_dim
    self.kernel, self.chunk_size = kernel, chunk_size
    self.q = head_dense(d_model, num_heads, key_dim, rngs)
    self.k = head_dense(d_model, num_heads, key_dim, rngs)
    self.v = head_dense(d_model, num_heads, head_dim, rngs)
    self.o = Dense((num_heads, head_dim), d_model, in_axes=("heads", "head_dim"),
                   out_axes=("embed",), rngs=rngs)

  def attend(self, q, k, v, segment_ids, state, log_decay=None):
    """The shared kernel with the configured choice; returns (o, state)."""
    return self.run_kernel(la.causal_linear_attention, q, k, v, segment_ids,
                           state, log_decay)

  def run_kernel(self, fn, q, k, v, segment_ids, state, log_decay):
    """`fn` (a LINEAR_ATTENTION entry point) with the configured form, on
    one device or split along the length
    (`layers.kernels.context_parallel`)."""
    kernel = functools.partial(fn, form=self.kernel, chunk_size=self.chunk_size)
    layout = context_parallel.length_layout()
    if layout is None:
      return kernel(q, k, v, log_decay=log_decay, segment_ids=segment_ids,
                    state=state)
    return context_parallel.linear_attention(
        layout, kernel, q, k, v, log_decay=log_decay, segment_ids=segment_ids,
        state=state)

  def zero_state(self, batch_size, dtype):
    return jnp.zeros((batch_size, self.num_heads, self.key_dim, self.head_dim),
                     jnp.float32)

  def projection_flops(self) -> float:
    return 2.0 * sum(m.kernel.size for m in (self.q, self.k, self.v, self.o))

  def kernel_flops(self, seq_len, key_dim, value_dim) -> float:
    """All heads of the shared kernel, in the form it runs."""
    return self.num_heads * la.flops_per_token(
        la.LINEAR_ATTENTION.choose(self.kernel).name, seq_len,
        self.chunk_size, key_dim, value_dim)


class FeatureAttention(LinearMixer):
  """Normalized linear attention:

    o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / sum_{s<=t} phi(q_t).phi(k_s)

  phi(.) has `feature_dim` channels. The state [B, H, feature_dim,
  head_dim + 1] (fp32) holds sum phi(k) v^T and, in its last column, the
  running sum of phi(k).
  """

  feature_dim: int

  def zero_state(self, batch_size, dtype):
    return jnp.zeros((batch_size, self.num_heads, self.feature_dim,
                      self.head_dim + 1), jnp.float32)

  def attend(self, fq, fk, v, segment_ids, state, log_decay=None):
    """Normalized linear attention of features fq, fk [B, L, H, F]."""
    return self.run_kernel(la.normalized_linear_attention, fq, fk, v,
                           segment_ids, state, log_decay)

  def flops_per_token(self, seq_len):
    return self.projection_flops() + self.kernel_flops(
        seq_len, self.feature_dim, self.head_dim + 1)
