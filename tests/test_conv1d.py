"""Causal depthwise conv: against a numpy loop, pieces == full, packed
segments == separate rows, and its input checks."""

import jax.numpy as jnp
import numpy as np
import pytest

from layers.kernels.conv1d import causal_conv1d

B, L, C, K = 2, 9, 3, 4


def data(seed=0):
  r = np.random.default_rng(seed)
  return (r.standard_normal((B, L, C)), r.standard_normal((K, C)),
          r.standard_normal(C))


def naive(x, w, b):
  """y[t] = b + sum_j w[K-1-j] x[t-j] over lags j with t-j >= 0."""
  y = np.tile(b, (x.shape[0], x.shape[1], 1))
  for t in range(x.shape[1]):
    for j in range(min(K, t + 1)):
      y[:, t] += w[K - 1 - j] * x[:, t - j]
  return y


def test_matches_naive_loop():
  x, w, b = data()
  y, state = causal_conv1d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
  np.testing.assert_allclose(np.asarray(y), naive(x, w, b), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(state), x[:, -(K - 1):].astype(np.float32))


def test_pieces_with_state_equal_full():
  x, w, b = map(jnp.asarray, data(1))
  y_full, s_full = causal_conv1d(x, w, b)
  state, outs = jnp.zeros((B, K - 1, C)), []
  for lo, hi in ((0, 1), (1, 3), (3, 4), (4, 9)):  # pieces shorter than K-1 too
    y, state = causal_conv1d(x[:, lo:hi], w, b, state)
    outs.append(y)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)),
                             np.asarray(y_full), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(state), np.asarray(s_full))


def test_segments_equal_separate_rows():
  x, w, b = map(jnp.asarray, data(2))
  seg = jnp.asarray([[0] * 2 + [1] * 7, [5] * 8 + [6]], jnp.int32)
  y, _ = causal_conv1d(x, w, b, segment_ids=seg)
  for row, cut in ((0, 2), (1, 8)):
    ref = jnp.concatenate([causal_conv1d(x[row:row + 1, :cut], w, b)[0],
                           causal_conv1d(x[row:row + 1, cut:], w, b)[0]], 1)
    np.testing.assert_allclose(np.asarray(y[row]), np.asarray(ref[0]),
                               rtol=1e-6, atol=1e-6)


def test_bad_inputs():
  x, w, b = map(jnp.asarray, data())
  with pytest.raises(ValueError, match="taps must be"):
    causal_conv1d(x, w[:, :2], b)
  with pytest.raises(ValueError, match="state must be"):
    causal_conv1d(x, w, b, jnp.zeros((B, K, C)))
  with pytest.raises(ValueError, match="segment_ids must be"):
    causal_conv1d(x, w, b, segment_ids=jnp.zeros((B, L + 1), jnp.int32))
  with pytest.raises(ValueError, match="not both"):
    causal_conv1d(x, w, b, jnp.zeros((B, K - 1, C)),
                  segment_ids=jnp.zeros((B, L), jnp.int32))
