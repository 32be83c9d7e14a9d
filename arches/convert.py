"""Shared by the checkpoint converters: torch-layout tensors to our
parameter dicts, and a DecoderLM built from a nested dict of arrays (the
`nnx.to_pure_dict` layout of its parameters).

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


def linear(sd, name: str, *out_shape: int) -> dict:
  """Our Dense params from the torch Linear `name` in state dict `sd`
  (weight [out, in], optional bias [out]): kernel [in, *out_shape], the
  output split as out_shape (e.g. heads, head_dim) if given."""
  w = sd[name + ".weight"]
  out_shape = out_shape or (w.shape[0],)
  out = {"kernel": w.T.reshape(w.shape[1], *out_shape)}
  if name + ".bias" in sd:
    out["bias"] = sd[name + ".bias"].reshape(out_shape)
  return out


def attention(sd, prefix: str, heads: int, kv_heads: int, head_dim: int) -> dict:
  """Our attention mixer's params from HF's q/k/v/o_proj under `prefix`."""
  o = sd[prefix + "o_proj.weight"]
  out = {"kernel": o.T.reshape(heads, head_dim, -1)}
  if prefix + "o_proj.bias" in sd:
    out["bias"] = sd[prefix + "o_proj.bias"]
  return {"proj": {"q": linear(sd, prefix + "q_proj", heads, head_dim),
                   "k": linear(sd, prefix + "k_proj", kv_heads, head_dim),
                   "v": linear(sd, prefix + "v_proj", kv_heads, head_dim),
                   "o": out}}


def swiglu(sd, prefix: str) -> dict:
  """Our swiglu's params from HF's gate/up/down_proj under `prefix`."""
  return {k: linear(sd, f"{prefix}{k}_proj") for k in ("gate", "up", "down")}


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
