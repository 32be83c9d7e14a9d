"""Channel-mixer registry (the per-token MLP of a block).

    from layers import channel
    mlp = channel.build("swiglu", 64, rngs=nnx.Rngs(0), hidden=256)

Channel mixers follow a reduced form of the sequence-mixer contract:
`y = cm(x)`, and `y, cache = cm(x, cache=cache)` after
`cache = cm.init_cache(batch_size, max_len, dtype)`. Stateless ones (MLP,
SwiGLU) keep an empty `NoState` as their cache; a mixer with token shift (RWKV's
channel mix) keeps its last token there.

Every channel mixer subclasses `ChannelMixer`, which adds:
  * `y, aux = cm.with_aux(x, segment_ids=...)`: the full-sequence output and
    the layer's auxiliary outputs (None for most; a mixture of experts
    returns its auxiliary losses and routing statistics, `moe.MoEAux`), an
    explicit return value so that jit, remat and grad carry it like any
    other output;
  * `info` / `info_for(**options)`: `ChannelInfo` (is the layer causal?),
    readable from a config before anything is built;
  * `flops_per_token()`: forward FLOPs per token (for MoE, the *active* ones).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.params import Dense
from layers.registry import Registry

REGISTRY = Registry("channel mixer", ("d_model",))
register = REGISTRY.register
names = REGISTRY.names
validate = REGISTRY.validate


def build(name: str, d_model: int, *, rngs: nnx.Rngs, **options) -> nnx.Module:
  return REGISTRY.build(name, d_model, rngs=rngs, **options)


@dataclasses.dataclass(frozen=True)
class ChannelInfo:
  """causal: a token's output depends on no later token (every per-token
  MLP; not a router that lets each expert pick tokens from the sequence)."""
  causal: bool = True


def info(name: str, options: dict) -> ChannelInfo:
  """The info of the registered channel mixer `name` built with `options`."""
  return REGISTRY.get(name).info_for(**options)


class ChannelMixer(nnx.Module):
  """Base of every channel mixer; see the module docstring."""

  info: ChannelInfo = ChannelInfo()

  @classmethod
  def info_for(cls, **options) -> ChannelInfo:
    del options  # the same for every option of the base's subclasses
    return cls.info

  def with_aux(self, x, *, segment_ids=None):
    return self(x, segment_ids=segment_ids), None

  def update_balance(self, aux) -> None:
    """A step outside the gradient from this layer's aux (summed over a
    batch), e.g. DeepSeek-V3's balancing bias; nothing by default."""


@struct.dataclass
class NoState:
  """The cache of a stateless channel mixer (an empty pytree, not None, so
  that `cache is None` still means "full-sequence call")."""


class Stateless(ChannelMixer):
  """Base for channel mixers without decode state."""

  def forward(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  def __call__(self, x, *, cache=None, segment_ids=None):
    y = self.forward(x)
    return y if cache is None else (y, cache)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    return NoState()

  def flops_per_token(self) -> float:
    return 2.0 * sum(v.size for v in jax.tree.leaves(nnx.state(self, nnx.Param))
                     if v.ndim == 2)


def _hidden(d_model: int, hidden: int | None, mult: float) -> int:
  return hidden if hidden is not None else int(mult * d_model)


@register("mlp")
class MLP(Stateless):
  """Transformer MLP (Vaswani et al., 2017) with GELU (Hendrycks & Gimpel,
  2016): y = W2 gelu(W1 x). Default hidden = 4 d_model."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, hidden: int | None = None,
               mult: float = 4.0, use_bias: bool = False):
    h = _hidden(d_model, hidden, mult)
    self.up = Dense(d_model, h, in_axes=("embed",), out_axes=("mlp",),
                    rngs=rngs, use_bias=use_bias)
    self.down = Dense(h, d_model, in_axes=("mlp",), out_axes=("embed",),
                      rngs=rngs, use_bias=use_bias)

  def forward(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


# Gate activations of the gated MLP: SiLU (SwiGLU), tanh-approximated GELU
# (GeGLU as in Gemma and Griffin).
GATE_ACTIVATIONS = {"silu": jax.nn.silu,
                    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


@register("swiglu")
class SwiGLU(Stateless):
  """Gated MLP with SiLU gate (Shazeer, 2020, "GLU Variants Improve
  Transformer"): y = W2 (silu(Wg x) * (Wu x)). Default hidden = 8/3
  d_model, which keeps the parameter count of a 4x MLP. activation
  "gelu_tanh" gives GeGLU (Gemma, Griffin); use_bias adds biases to the
  three projections (Griffin has them)."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, hidden: int | None = None,
               mult: float = 8 / 3, activation: str = "silu",
               use_bias: bool = False):
    if activation not in GATE_ACTIVATIONS:
      raise ValueError(f"swiglu: unknown activation {activation!r}; choose "
                       f"one of {sorted(GATE_ACTIVATIONS)}")
    self.activation = activation
    h = _hidden(d_model, hidden, mult)
    dense = lambda i, o, ia, oa: Dense(i, o, in_axes=(ia,), out_axes=(oa,),
                                       rngs=rngs, use_bias=use_bias)
    self.gate = dense(d_model, h, "embed", "mlp")
    self.up = dense(d_model, h, "embed", "mlp")
    self.down = dense(h, d_model, "mlp", "embed")

  def forward(self, x):
    act = GATE_ACTIVATIONS[self.activation]
    return self.down(act(self.gate(x)) * self.up(x))


from layers.channel import rwkv as _rwkv  # noqa: E402,F401  (registers rwkv4_channel)
from layers.channel import moe as _moe  # noqa: E402,F401  (registers moe)
