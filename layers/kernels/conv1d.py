"""Short causal depthwise convolution over time, with carried state.

Mamba and Mamba-2 convolve their inner activations over time with a few
taps per channel (K = 4) before the scan; Griffin's recurrent block does
the same before its RG-LRU. The state for incremental calls is the last
K-1 inputs, so feeding a sequence in pieces gives the full-sequence
outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.positions import segment_positions


def causal_conv1d(x_BxLxC: jax.Array, w_KxC: jax.Array,
                  b_C: jax.Array | None = None,
                  state: jax.Array | None = None, *,
                  segment_ids: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """y[t] = b + sum_k w[k] * x[t - (K-1) + k], per channel.

  w[K-1] weighs the current input (PyTorch's `Conv1d(groups=C,
  padding=K-1)` weight [C, 1, K] is `w_KxC.T`).

  Args:
    x_BxLxC: inputs.
    w_KxC, b_C: taps and optional bias.
    state: [B, K-1, C], the K-1 inputs before x; None means the sequence
      starts here (zeros).
    segment_ids: [B, L] for packed rows of a full-sequence call: taps do
      not reach across a change of segment id (so every segment, the
      first included, starts from zeros; not combinable with state).

  Returns:
    y [B, L, C] in x's dtype (accumulated in fp32) and the new state
    [B, K-1, C] (the last K-1 inputs of state ++ x) in state's dtype, or
    x's dtype when state was None.
  """
  B, L, C = x_BxLxC.shape
  if w_KxC.ndim != 2 or w_KxC.shape[1] != C:
    raise ValueError(f"causal_conv1d: taps must be [K, C={C}], got {w_KxC.shape}")
  K = w_KxC.shape[0]
  if segment_ids is not None:
    if segment_ids.shape != (B, L):
      raise ValueError(f"causal_conv1d: segment_ids must be [B, L] = "
                       f"{(B, L)}, got {segment_ids.shape}")
    if state is not None:
      raise ValueError("causal_conv1d: segment_ids are for full-sequence "
                       "calls; pass either segment_ids or state, not both")
  if state is None:
    state = jnp.zeros((B, K - 1, C), x_BxLxC.dtype)
  elif state.shape != (B, K - 1, C):
    raise ValueError(f"causal_conv1d: state must be [B, K-1, C] = "
                     f"{(B, K - 1, C)}, got {state.shape}")
  xp_BxSxC = jnp.concatenate([state.astype(x_BxLxC.dtype), x_BxLxC], axis=1)
  w = w_KxC.astype(jnp.float32)
  pos_BxL = None if segment_ids is None else segment_positions(segment_ids)
  y = jnp.zeros((B, L, C), jnp.float32) if b_C is None else jnp.broadcast_to(
      b_C.astype(jnp.float32), (B, L, C))
  for k in range(K):
    tap = xp_BxSxC[:, k:k + L].astype(jnp.float32) * w[k]
    if pos_BxL is not None:  # lag K-1-k must stay inside the segment
      tap = jnp.where((K - 1 - k <= pos_BxL)[..., None], tap, 0.0)
    y = y + tap
  return y.astype(x_BxLxC.dtype), xp_BxSxC[:, L:].astype(state.dtype)
