"""HuggingFace transformers Mamba / Mamba-2 checkpoints -> DecoderLM.

    model = from_hf_mamba(hf_model)                      # MambaForCausalLM
    model = from_hf_mamba2(state_dict, hf_config)        # Mamba2ForCausalLM

HF Mamba blocks are `x + mixer(RMSNorm(x))` with no MLP, a final RMSNorm
and a (possibly tied) LM head, i.e. `LMConfig(channel=None,
norm="rmsnorm")`; both RMSNorms compute `weight * x * rsqrt(mean(x^2) +
eps)` in fp32, as `layers.norms.RMSNorm` does. Tensors may be torch
tensors or arrays; torch itself is not imported here. Every HF tensor
must be used and every parameter of ours set, else ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from arches.convert import to_numpy
from arches.lm import DecoderLM, LMConfig


class _Loader:
  """Pops HF tensors by name and writes them into our parameters,
  checking shapes and that nothing is left over on either side."""

  def __init__(self, state_dict: Mapping, model: DecoderLM):
    self.tensors = {k: to_numpy(v) for k, v in state_dict.items()}
    self.unset = {id(v): path for path, v in nnx.iter_graph(model)
                  if isinstance(v, nnx.Param)}

  def take(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise ValueError(f"HF state dict has no tensor {name!r}")
    return self.tensors.pop(name)

  def set(self, variable: nnx.Param, value: np.ndarray, name: str) -> None:
    if variable.shape != value.shape:
      raise ValueError(f"{name}: HF gives shape {value.shape}, ours is "
                       f"{variable.shape}")
    variable.set_value(jnp.asarray(value))
    self.unset.pop(id(variable), None)

  def finish(self) -> None:
    if self.tensors:
      raise ValueError(f"HF tensors not used: {sorted(self.tensors)}")
    if self.unset:
      raise ValueError(f"parameters not set: {sorted(map(str, self.unset.values()))}")


def _lm_config(config, mixer: str, **mixer_options) -> LMConfig:
  """The LMConfig fields both HF configs share."""
  if config.hidden_act != "silu":
    raise ValueError(f"HF config hidden_act={config.hidden_act!r} is not "
                     "supported; this converter needs 'silu'")
  return LMConfig(
      vocab_size=config.vocab_size, d_model=config.hidden_size,
      n_layers=config.num_hidden_layers, channel=None, norm="rmsnorm",
      norm_eps=config.layer_norm_epsilon,
      tie_embeddings=config.tie_word_embeddings,
      mixer={"name": mixer, "expand": config.expand,
             "d_state": config.state_size, "d_conv": config.conv_kernel,
             "use_bias": config.use_bias, "conv_bias": config.use_conv_bias,
             **mixer_options})


def lm_config_from_hf_mamba(config) -> LMConfig:
  """LMConfig for a transformers `MambaConfig`."""
  return _lm_config(config, "mamba", dt_rank=int(config.time_step_rank))


def lm_config_from_hf_mamba2(config) -> LMConfig:
  """LMConfig for a transformers `Mamba2Config`."""
  if tuple(config.time_step_limit) != (0.0, float("inf")):
    raise ValueError(f"HF config time_step_limit={config.time_step_limit} is "
                     "not supported; this converter needs (0.0, inf) (no clamp)")
  return _lm_config(config, "mamba2", head_dim=config.head_dim,
                    n_groups=config.n_groups, chunk_size=config.chunk_size,
                    norm_eps=config.layer_norm_epsilon)


def _state_and_config(hf, config):
  if config is None:
    if not hasattr(hf, "config"):
      raise ValueError("pass the HF config along with a bare state dict")
    config = hf.config
  return (hf.state_dict() if hasattr(hf, "state_dict") else hf), config


def _linear_from(ld: _Loader, dense, name: str, w, b=None) -> None:
  """torch Linear weight [out, in] and bias [out] -> our kernel [in, *out]."""
  ld.set(dense.kernel, w.T.reshape(dense.kernel.shape), name)
  if dense.bias is not None:
    ld.set(dense.bias, b.reshape(dense.bias.shape), f"{name}.bias")


def _linear(ld: _Loader, dense, prefix: str) -> None:
  b = None if dense.bias is None else ld.take(f"{prefix}.bias")
  _linear_from(ld, dense, prefix, ld.take(f"{prefix}.weight"), b)


def _load(hf, config, lm_config_fn, load_mixer) -> DecoderLM:
  state, config = _state_and_config(hf, config)
  cfg = lm_config_fn(config)
  # Shapes only: every parameter is then set from HF (finish() checks).
  model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  ld = _Loader(state, model)
  ld.set(model.embed.embedding, ld.take("backbone.embeddings.weight"),
         "embeddings")
  for i, block in enumerate(model.blocks):
    p = f"backbone.layers.{i}"
    ld.set(block.mixer_norm.scale, ld.take(f"{p}.norm.weight"), f"{p}.norm")
    load_mixer(ld, block.mixer, f"{p}.mixer")
  ld.set(model.final_norm.scale, ld.take("backbone.norm_f.weight"), "norm_f")
  head = ld.take("lm_head.weight")  # present (a copy) even when tied
  if model.head is not None:
    ld.set(model.head.kernel, head.T, "lm_head")
  ld.finish()
  return model


def _conv(ld: _Loader, conv, prefix: str) -> None:
  ld.set(conv.weight, ld.take(f"{prefix}.weight")[:, 0].T, prefix)  # [C,1,K]
  if conv.bias is not None:
    ld.set(conv.bias, ld.take(f"{prefix}.bias"), f"{prefix}.bias")


def _mamba_mixer(ld: _Loader, m, p: str) -> None:
  _linear(ld, m.in_proj, f"{p}.in_proj")  # rows: [x | z]
  _conv(ld, m.conv, f"{p}.conv1d")
  _linear(ld, m.x_proj, f"{p}.x_proj")    # rows: [dt | B | C]
  _linear_from(ld, m.dt_proj, f"{p}.dt_proj", ld.take(f"{p}.dt_proj.weight"))
  ld.set(m.dt_bias, ld.take(f"{p}.dt_proj.bias"), f"{p}.dt_proj.bias")
  for name in ("A_log", "D"):
    ld.set(getattr(m, name), ld.take(f"{p}.{name}"), f"{p}.{name}")
  _linear(ld, m.out_proj, f"{p}.out_proj")


def _mamba2_mixer(ld: _Loader, m, p: str) -> None:
  # HF in_proj rows: [z | x | B | C | dt]; ours: in_proj [x, z], bcdt_proj.
  I = m.d_inner
  w = ld.take(f"{p}.in_proj.weight")
  b = (ld.take(f"{p}.in_proj.bias") if m.in_proj.bias is not None
       else np.zeros(w.shape[0], np.float32))
  x_then_z = np.r_[I:2 * I, 0:I]
  _linear_from(ld, m.in_proj, f"{p}.in_proj", w[x_then_z], b[x_then_z])
  _linear_from(ld, m.bcdt_proj, f"{p}.in_proj", w[2 * I:], b[2 * I:])
  _conv(ld, m.conv, f"{p}.conv1d")        # channels: [x | B | C]
  for name in ("dt_bias", "A_log", "D"):
    ld.set(getattr(m, name), ld.take(f"{p}.{name}"), f"{p}.{name}")
  ld.set(m.norm.weight, ld.take(f"{p}.norm.weight"), f"{p}.norm")
  _linear(ld, m.out_proj, f"{p}.out_proj")


def from_hf_mamba(hf_model_or_state_dict, config=None) -> DecoderLM:
  """DecoderLM with the weights of a transformers MambaForCausalLM (or its
  state dict plus its MambaConfig)."""
  return _load(hf_model_or_state_dict, config, lm_config_from_hf_mamba,
               _mamba_mixer)


def from_hf_mamba2(hf_model_or_state_dict, config=None) -> DecoderLM:
  """DecoderLM with the weights of a transformers Mamba2ForCausalLM (or its
  state dict plus its Mamba2Config)."""
  return _load(hf_model_or_state_dict, config, lm_config_from_hf_mamba2,
               _mamba2_mixer)
