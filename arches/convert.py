"""Shared by the checkpoint converters: build a DecoderLM from a nested
dict of arrays (the `nnx.to_pure_dict` layout of its parameters).

The model is built abstractly (`nnx.eval_shape`, no random init), then
every parameter is filled from the dict; a missing, extra or misshapen
entry is an error naming its path, so a converter cannot silently leave a
parameter at its init.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arches.lm import DecoderLM, LMConfig


def to_numpy(t) -> np.ndarray:
  """fp32 numpy from a torch tensor (read without importing torch) or array."""
  if hasattr(t, "detach"):
    t = t.detach().float().cpu().numpy()
  return np.asarray(t, np.float32)


def _paths(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): v for p, v in flat}


def model_from_params(cfg: LMConfig, params: dict) -> DecoderLM:
  """A DecoderLM for `cfg` whose parameters are exactly `params` (fp32)."""
  model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  want = _paths(nnx.to_pure_dict(state))
  got = _paths(params)
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"converted parameters do not fit the model: missing "
                     f"{missing}, unexpected {extra}")
  for path, spec in want.items():
    if tuple(np.shape(got[path])) != tuple(spec.shape):
      raise ValueError(f"parameter {path}: converted shape "
                       f"{tuple(np.shape(got[path]))} != model shape {spec.shape}")
  nnx.replace_by_pure_dict(state, jax.tree.map(
      lambda a: jnp.asarray(a, jnp.float32), params))
  nnx.update(model, state)
  return model
