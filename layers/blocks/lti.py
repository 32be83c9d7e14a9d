"""The layer shell shared by S4, S4D and DSS: an LTI SSM applied to each of
the d_model channels of x, then GELU and a gated linear output, as in the
S4 family's code. Subclasses set `self.core` (the SSM: `__call__` full
form, `step` incremental form, `init_state`, `flops_per_token`)."""

from __future__ import annotations

import jax.numpy as jnp

from layers.kernels.fftconv import CAUSAL_CONV
from layers.mixers.base import Mixer


class LTIMixer(Mixer):
  """y = GLU(W GELU(SSM(x))): the S4-family layer around `core`."""

  kernel_ops = {"kernel": CAUSAL_CONV}

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    if cache is None:
      return self.out(self.core(x).astype(x.dtype))
    y, state = self.core.step(x, cache)
    return self.out(y.astype(x.dtype)), state

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    # Constant-size fp32 state: neither max_len nor dtype changes it.
    return self.core.init_state((batch_size,))

  def flops_per_token(self, seq_len):
    return self.core.flops_per_token(seq_len) + self.out.flops_per_token()
