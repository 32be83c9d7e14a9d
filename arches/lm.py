"""A decoder-only language model over any registered sequence mixer.

    cfg = LMConfig(vocab_size=256, d_model=128, n_layers=4,
                   mixer=["mamba", "mamba", {"name": "attention", "num_heads": 4}])
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    logits_BxLxV = model(tokens_BxL)

Embedding, then n_layers blocks of
    x = x + mixer(norm(x));  x = x + channel(norm(x))
then a final norm and the logits (tied to the embedding or not). `mixer` and
`channel` are each one spec or a list of specs cycled over depth, so a
hybrid is one line (channel: [swiglu, moe] alternates dense and
mixture-of-experts layers, as GShard and Switch do). A spec is a registered
name or {"name": ..., **options}; a channel spec may be "none".

`model.with_aux(tokens)` returns (logits, aux): aux maps a layer index to
what that layer's channel mixer returns besides its output (a mixture of
experts: its auxiliary losses and routing statistics, `MoEAux`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from flax.core import FrozenDict

from arches.validation import (ConfigError, above, at_least, check_fields, one_of,
                               optional)
from layers import channel, mixers, norms, parallel
from layers.params import Dense, Embed, count_params, fan_in_init

Spec = str | Mapping
# Compute dtypes: float16 would need loss scaling, which the trainer lacks.
DTYPES = ("float32", "bfloat16")


def freeze(obj):
  """Lists -> tuples, dicts -> FrozenDicts, recursively: configs live in the
  module's static graph, which jit hashes."""
  if isinstance(obj, Mapping):
    return FrozenDict({k: freeze(v) for k, v in obj.items()})
  if isinstance(obj, (list, tuple)):
    return tuple(freeze(v) for v in obj)
  return obj


def thaw(obj):
  """The inverse of `freeze`, for writing configs out."""
  if isinstance(obj, Mapping):
    return {k: thaw(v) for k, v in obj.items()}
  if isinstance(obj, tuple):
    return [thaw(v) for v in obj]
  return obj


def normalize_spec(spec: Spec, registry) -> tuple[str, dict]:
  """("name", options) from "name" or {"name": ..., **options}, validated."""
  if isinstance(spec, str):
    name, options = spec, {}
  elif isinstance(spec, Mapping):
    options = dict(spec)
    if "name" not in options:
      raise ValueError(f"{registry.kind} spec {spec} needs a 'name'; "
                       f"registered: {registry.names()}")
    name = options.pop("name")
  else:
    raise TypeError(f"{registry.kind} spec must be a name or a dict with "
                    f"'name', got {type(spec).__name__}: {spec!r}")
  registry.validate(name, options)
  return name, options


def _spec_check(key: str, specs: Callable[[], Any]) -> None:
  """The registry's error for a bad spec (unknown name or option, wrong
  option type), as a ConfigError naming the key."""
  try:
    specs()
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{key}: {e}", key) from None


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Model hyperparameters. All fields are plain data (configs are data).

  mixer: a spec or a list of specs, cycled over n_layers.
  channel: a channel-mixer spec or a list of them cycled over n_layers; None
    or "none" for blocks without one (Mamba). Channel mixers must be causal
    (`channel.ChannelInfo`): expert-choice routing is refused.
  dtype: compute dtype of activations; parameters stay fp32.
  embed_scale: multiply input embeddings (Gemma uses sqrt(d_model)).
  embed_norm: normalize embeddings before the first block (RWKV's ln0).
  logit_softcap: c * tanh(logits / c) (Gemma 2, Griffin).
  remat: recompute each block in the backward pass to save memory.

  Every field is checked when the config is built; a bad value raises
  `ConfigError` naming model.<field>, the value and what is allowed.
  """
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  mixer: Any = "attention"
  channel: Any = "swiglu"
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  embed_scale: float | None = None
  embed_norm: bool = False
  logit_softcap: float | None = None
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    object.__setattr__(self, "mixer", freeze(self.mixer))
    object.__setattr__(self, "channel", freeze(self.channel))
    check_fields(self, "model", vocab_size=at_least(2), d_model=at_least(1),
                 n_layers=at_least(1), norm=one_of(sorted(norms.NORMS)),
                 norm_eps=above(0), embed_scale=optional(above(0)),
                 logit_softcap=optional(above(0)), dtype=one_of(DTYPES))
    if self.mixer in (None, "", ()):
      raise ConfigError(f"model.mixer is empty: give a registered sequence mixer, "
                        f"{{name: ..., option: ...}} or a list of them. Registered: "
                        f"{', '.join(sorted(mixers.names()))}.", "model.mixer")
    _spec_check("model.mixer", self.mixer_specs)
    _spec_check("model.channel", self.channel_specs)

  def to_dict(self) -> dict:
    return {f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}

  def mixer_specs(self) -> list[tuple[str, dict]]:
    """One (name, options) per layer: the pattern cycled over depth."""
    pattern = self.mixer if isinstance(self.mixer, tuple) else (self.mixer,)
    specs = [normalize_spec(s, mixers.REGISTRY) for s in pattern]
    return [specs[i % len(specs)] for i in range(self.n_layers)]

  def channel_specs(self) -> list[tuple[str, dict] | None]:
    """One (name, options) or None per layer: the pattern cycled over depth."""
    pattern = self.channel if isinstance(self.channel, tuple) else (self.channel,)
    if not pattern:
      raise ValueError("LMConfig.channel pattern is empty")
    specs = [None if s in (None, "none") else normalize_spec(s, channel.REGISTRY)
             for s in pattern]
    for spec in filter(None, specs):
      if not channel.info(*spec).causal:
        raise ValueError(
            f"channel mixer {spec[0]!r} with options {spec[1]} is not causal "
            "(router='expert_choice' lets each expert pick tokens from the whole "
            "sequence), and a decoder LM must be; use a token-choice router "
            "(softmax_topk, topk_softmax, sigmoid_bias). Expert choice is for "
            "non-causal (encoder) use of the layer.")
    return [specs[i % len(specs)] for i in range(self.n_layers)]


@struct.dataclass
class BlockCache:
  mixer: Any
  channel: Any


class Block(nnx.Module):
  """Pre-norm residual block: sequence mixer, then channel mixer."""

  def __init__(self, cfg: LMConfig, spec: tuple[str, dict],
               ch: tuple[str, dict] | None, *, rngs: nnx.Rngs):
    name, options = spec
    self.mixer_norm = norms.build(cfg.norm, cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
    self.mixer = mixers.build(name, cfg.d_model, rngs=rngs, **options)
    if ch is None:
      self.channel_norm = self.channel = None
    else:
      self.channel_norm = norms.build(cfg.norm, cfg.d_model, rngs=rngs,
                                      eps=cfg.norm_eps)
      self.channel = channel.build(ch[0], cfg.d_model, rngs=rngs, **ch[1])

  def with_aux(self, x, *, segment_ids=None):
    """(x, the channel mixer's aux or None) for a full sequence."""
    x = x + self.mixer(self.mixer_norm(x), segment_ids=segment_ids)
    if self.channel is None:
      return x, None
    h, aux = self.channel.with_aux(self.channel_norm(x), segment_ids=segment_ids)
    return x + h, aux

  def __call__(self, x, *, cache: BlockCache | None = None, segment_ids=None):
    if cache is None:
      return self.with_aux(x, segment_ids=segment_ids)[0]
    h, mixer_cache = self.mixer(self.mixer_norm(x), cache=cache.mixer)
    x = x + h
    channel_cache = cache.channel
    if self.channel is not None:
      h, channel_cache = self.channel(self.channel_norm(x), cache=cache.channel)
      x = x + h
    return x, BlockCache(mixer_cache, channel_cache)

  def init_cache(self, batch_size, max_len, dtype):
    return BlockCache(
        self.mixer.init_cache(batch_size, max_len, dtype),
        None if self.channel is None else
        self.channel.init_cache(batch_size, max_len, dtype))


class DecoderLM(nnx.Module):
  """Decoder-only LM; see the module docstring.

  Logits are fp32 whatever the compute dtype, so the loss is taken in fp32.
  Embeddings start at std 0.5/sqrt(d_model) (GPT-2's 0.02 at d=768), so the
  initial loss is close to ln(vocab_size).
  """

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                       init=fan_in_init(cfg.d_model, 0.5))
    self.embed_norm = (norms.build(cfg.norm, cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
                       if cfg.embed_norm else None)
    self.blocks = nnx.List([Block(cfg, spec, ch, rngs=rngs) for spec, ch in
                            zip(cfg.mixer_specs(), cfg.channel_specs())])
    self.final_norm = norms.build(cfg.norm, cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
    self.head = None if cfg.tie_embeddings else Dense(
        cfg.d_model, cfg.vocab_size, in_axes=("embed",), out_axes=("vocab",),
        rngs=rngs, init_scale=0.5)

  @property
  def dtype(self):
    return jnp.dtype(self.cfg.dtype)

  def embed_tokens(self, tokens_BxL):
    x = self.embed(tokens_BxL, self.dtype)
    if self.cfg.embed_scale is not None:
      x = x * jnp.asarray(self.cfg.embed_scale, self.dtype)
    return x if self.embed_norm is None else self.embed_norm(x)

  def logits(self, x_BxLxD):
    x = self.final_norm(x_BxLxD)
    out = self.embed.attend(x) if self.head is None else self.head(x)
    out = out.astype(jnp.float32)
    if self.cfg.logit_softcap is not None:
      c = self.cfg.logit_softcap
      out = c * jnp.tanh(out / c)
    return out

  def with_aux(self, tokens_BxL, *, segment_ids=None) -> tuple[jax.Array, dict]:
    """(logits [B, L, vocab] fp32, aux): aux maps the index of each layer
    whose channel mixer has auxiliary outputs to them (see module doc)."""
    # Pinned at every block boundary: batch and length split as the layout
    # says (layers.parallel; no-op on one device), d_model whole.
    pin = lambda x_BxLxD: parallel.constrain(x_BxLxD, parallel.BATCH,
                                             parallel.LENGTH, None)
    x = pin(self.embed_tokens(tokens_BxL))
    aux = {}
    for i, block in enumerate(self.blocks):
      if self.cfg.remat:  # a pure function of the block's state: nothing to write back
        graphdef, state = nnx.split(block)
        x, a = jax.checkpoint(lambda st, x, s, g=graphdef: nnx.merge(g, st).with_aux(
            x, segment_ids=s))(state, x, segment_ids)
      else:
        x, a = block.with_aux(x, segment_ids=segment_ids)
      x = pin(x)
      if a is not None:
        aux[i] = a
    return self.logits(x), aux

  def update_balance(self, aux: dict) -> None:
    """Apply each layer's balancing step (DeepSeek-V3's bias) from `aux`
    (what `with_aux` returned, loads summed over micro-batches)."""
    for i, a in aux.items():
      self.blocks[i].channel.update_balance(a)

  def __call__(self, tokens_BxL, *, cache=None, segment_ids=None):
    """Logits [B, L, vocab] (fp32); with `cache`, (logits, new_cache)."""
    if cache is None:
      return self.with_aux(tokens_BxL, segment_ids=segment_ids)[0]
    x = self.embed_tokens(tokens_BxL)
    if segment_ids is not None:
      raise ValueError("segment_ids are for full-sequence calls, not with a cache")
    new = []
    for block, c in zip(self.blocks, cache, strict=True):
      x, c = block(x, cache=c)
      new.append(c)
    return self.logits(x), tuple(new)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> tuple:
    dtype = self.dtype if dtype is None else dtype
    return tuple(b.init_cache(batch_size, max_len, dtype) for b in self.blocks)

  def num_params(self) -> int:
    return count_params(self)

  def flops_per_token(self, seq_len: int) -> float:
    """Forward model FLOPs per token at context `seq_len` (train ~= 3x)."""
    total = 2.0 * self.cfg.d_model * self.cfg.vocab_size  # logits
    for b in self.blocks:
      total += b.mixer.flops_per_token(seq_len)
      if b.channel is not None:
        total += b.channel.flops_per_token()
    return total


def cross_entropy(logits_BxLxV, targets_BxL, mask_BxL=None):
  """Mean token cross-entropy in fp32 over positions where mask is true."""
  logits = logits_BxLxV.astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets_BxL[..., None],
                             axis=-1)[..., 0]
  if mask_BxL is None:
    return nll.mean()
  mask = mask_BxL.astype(jnp.float32)
  return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)
