"""HuggingFace checkpoints -> DecoderLM: the one converter style.

Every family module (`arches.hf_llama`, `hf_mamba`, `hf_rwkv`,
`hf_recurrentgemma`, `hf_moe`) exposes

    cfg, params = from_hf(hf_config, state_dict)   # (LMConfig, nested dict)
    model = model_from_params(cfg, params)

working from a state dict of torch tensors or arrays (a checkpoint read
with safetensors, or `model.state_dict()`; torch is never imported here),
and `load(hf_model)` does both for a live transformers model, picking the
family from its config's `model_type` (`FAMILIES`).

The tensor helpers below (Linear, depthwise Conv1d, Embedding, norms) are
shared by all families. Both sides are checked: an HF tensor that is read
but missing, or never read, is an error naming it (`Tensors`), and the
model is built abstractly (`nnx.eval_shape`, no random init) and filled so
that a missing, extra or misshapen parameter is an error naming its path
(`model_from_params`); a converter cannot leave a parameter at its init or
drop a tensor on the floor.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arches.lm import DecoderLM, LMConfig

# HF config.model_type -> the module whose from_hf converts it.
FAMILIES = {
    "llama": "arches.hf_llama", "mistral": "arches.hf_llama",
    "mamba": "arches.hf_mamba", "mamba2": "arches.hf_mamba",
    "rwkv": "arches.hf_rwkv", "recurrent_gemma": "arches.hf_recurrentgemma",
    "mixtral": "arches.hf_moe", "qwen2_moe": "arches.hf_moe", "jamba": "arches.hf_moe",
}


def to_numpy(t) -> np.ndarray:
  """fp32 numpy from a torch tensor (read without importing torch) or array."""
  if hasattr(t, "detach"):
    t = t.detach().float().cpu().numpy()
  return np.asarray(t, np.float32)


class Tensors:
  """An HF state dict as fp32 numpy, names with `strip` removed from the
  front. Reading a missing name is a ValueError naming it; `finish()`
  refuses tensors that were never read."""

  def __init__(self, state_dict: Mapping[str, Any], strip: str = ""):
    self._strip = strip
    self._original = {k.removeprefix(strip): k for k in state_dict}
    self._arrays = {k.removeprefix(strip): to_numpy(v) for k, v in state_dict.items()}
    self._unread = set(self._arrays)

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._arrays:
      where = f" (with or without the prefix {self._strip!r})" if self._strip else ""
      raise ValueError(f"HF state dict has no tensor {name!r}{where}")
    self._unread.discard(name)
    return self._arrays[name]

  def get(self, name: str) -> np.ndarray | None:
    """The tensor, or None where the checkpoint has none (an optional bias)."""
    return self[name] if name in self._arrays else None

  def finish(self) -> None:
    if self._unread:
      raise ValueError("HF tensors not used: "
                       f"{sorted(self._original[k] for k in self._unread)}")


def dense(weight: np.ndarray, bias: np.ndarray | None = None,
          out_shape: tuple = (), in_shape: tuple = ()) -> dict:
  """Our Dense params from a torch Linear's weight [out, in] and bias [out]:
  kernel [*in_shape, *out_shape], the sides split as given (e.g. heads,
  head_dim), else kept flat. A bias on one side only is caught by
  `model_from_params` as a missing or unexpected entry."""
  w = weight.T
  in_shape, out_shape = in_shape or w.shape[:1], out_shape or w.shape[1:]
  out = {"kernel": w.reshape(*in_shape, *out_shape)}
  if bias is not None:
    out["bias"] = bias.reshape(out_shape)
  return out


def linear(sd: Tensors, name: str, out_shape: tuple = (), in_shape: tuple = ()) -> dict:
  """Our Dense params from the torch Linear `name` (bias if it has one)."""
  return dense(sd[name + ".weight"], sd.get(name + ".bias"), out_shape, in_shape)


def conv(sd: Tensors, name: str) -> dict:
  """Our causal depthwise conv from a torch Conv1d(groups=C): weight
  [C, 1, K] -> [K, C], bias [C] if it has one."""
  out = {"weight": sd[name + ".weight"][:, 0].T}
  if (bias := sd.get(name + ".bias")) is not None:
    out["bias"] = bias
  return out


def norm(sd: Tensors, name: str, offset: float = 0.0) -> dict:
  """Our RMSNorm/LayerNorm from a torch norm's weight (+ offset: Gemma
  scales by 1 + w) and bias if it has one."""
  out = {"scale": sd[name + ".weight"] + offset}
  if (bias := sd.get(name + ".bias")) is not None:
    out["bias"] = bias
  return out


def embedding(sd: Tensors, name: str) -> dict:
  return {"embedding": sd[name + ".weight"]}


def attention(sd: Tensors, prefix: str, heads: int, kv_heads: int, head_dim: int) -> dict:
  """Our attention mixer's params from HF's q/k/v/o_proj under `prefix`."""
  return {"proj": {"q": linear(sd, prefix + "q_proj", (heads, head_dim)),
                   "k": linear(sd, prefix + "k_proj", (kv_heads, head_dim)),
                   "v": linear(sd, prefix + "v_proj", (kv_heads, head_dim)),
                   "o": linear(sd, prefix + "o_proj", in_shape=(heads, head_dim))}}


def swiglu(sd: Tensors, prefix: str) -> dict:
  """Our swiglu's params from HF's gate/up/down_proj under `prefix`."""
  return {k: linear(sd, f"{prefix}{k}_proj") for k in ("gate", "up", "down")}


def lm_params(sd: Tensors, cfg: LMConfig, blocks: dict, *, embed: str,
              final_norm: str, head: str = "lm_head", norm_offset: float = 0.0) -> dict:
  """The whole model's params around converted `blocks`; every HF tensor
  must have been read by now. A tied model's state dict still lists the
  head (a copy of the embedding), which is read and must equal it."""
  params = {"embed": embedding(sd, embed), "blocks": blocks,
            "final_norm": norm(sd, final_norm, norm_offset)}
  head_w = sd.get(head + ".weight")
  if not cfg.tie_embeddings:
    params["head"] = linear(sd, head)
  elif head_w is not None and not np.array_equal(head_w, params["embed"]["embedding"]):
    raise ValueError(f"tie_word_embeddings is set but {head}.weight differs "
                     "from the embedding")
  sd.finish()
  return params


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


def load(hf_model) -> DecoderLM:
  """A DecoderLM with the config and weights of a live transformers model.

  Refuses RWKV weights that transformers rescaled in place (an inference
  forward with rescale_every > 0 divides some layers and flags it on the
  backbone): they are no longer the checkpoint's."""
  model_type = hf_model.config.model_type
  if model_type not in FAMILIES:
    raise ValueError(f"HF model_type {model_type!r} has no converter; "
                     f"supported: {sorted(FAMILIES)}")
  if getattr(hf_model.base_model, "layers_are_rescaled", False):
    raise ValueError("the RWKV weights were rescaled in place by an inference "
                     "forward with rescale_every > 0; convert before running "
                     "the model, or set rescale_every=0")
  # Imported here: the family modules import this one for its helpers.
  family = importlib.import_module(FAMILIES[model_type])
  return model_from_params(*family.from_hf(hf_model.config, hf_model.state_dict()))
