"""The sequence-mixer contract.

Every sequence mixer is an `nnx.Module` subclass of `Mixer` with:

  y = mixer(x)                              # full sequence, causal
  y = mixer(x, segment_ids=seg)             # packed rows, if supported
  cache = mixer.init_cache(batch_size, max_len, dtype)
  y, cache = mixer(x_piece, cache=cache)    # incremental, any piece length

x and y are [batch, length, d_model] with the same dtype. Feeding a
sequence in pieces gives the full-sequence outputs. Caches are
`flax.struct` dataclasses (pytrees of arrays), so they jit, donate and
shard like parameters.

Class metadata (`info`) declares the family, the paper, the costs and
which kinds of model parallelism the mixer runs under (`tensor_parallel`:
its weights split by heads over a "tensor" mesh axis, Megatron style, every
head's work on one device; `sequence_parallel`: a full-sequence call split
along the length over a "sequence" axis, `layers.kernels.context_parallel`);
`flops_per_token(seq_len)` gives model FLOPs per token for MFU. Options are
the keyword arguments of `__init__` (an options dataclass among them, e.g.
`layers.blocks.attention.AttentionOptions`, gives its fields); the registry
validates them. `kernel_ops` names the op (`layers.kernels.Op`) that each
kernel-choice option picks from: the option is "auto" or one of the op's
implementations, checked when a config is loaded; the mixer itself only
passes it to `Op.choose`.

Past the cache: a piece that cannot fit is a ValueError when the cache
position is concrete (eager calls); under jit the position is traced, so
the outputs of an overflowing call are NaN instead of silently wrong.
`arches.generate` checks lengths before it traces.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from layers.registry import OptionError

if TYPE_CHECKING:
  from layers.kernels import Op

# How training cost grows with sequence length L -> expected exponent k in
# time ~ L^k (n log n is measured as slightly above 1).
TRAIN_COSTS = {"quadratic": 2.0, "linear": 1.0, "n log n": 1.0}
# How the incremental (decode) state grows with the number of tokens seen.
DECODE_STATES = ("length", "bounded", "constant")


@dataclasses.dataclass(frozen=True)
class MixerInfo:
  family: str
  paper: str
  train_cost: str
  decode_state: str
  supports_segments: bool
  tensor_parallel: bool = False
  sequence_parallel: bool = False

  def __post_init__(self):
    if self.train_cost not in TRAIN_COSTS:
      raise ValueError(f"train_cost {self.train_cost!r} not in {list(TRAIN_COSTS)}")
    if self.decode_state not in DECODE_STATES:
      raise ValueError(f"decode_state {self.decode_state!r} not in {DECODE_STATES}")


class Mixer(nnx.Module):
  """Base class; see the module docstring for the contract."""

  info: ClassVar[MixerInfo]
  # Kernel-choice option name -> the op it picks an implementation of.
  kernel_ops: ClassVar[Mapping[str, "Op"]] = {}

  @classmethod
  def check_options(cls, options: Mapping[str, Any]) -> None:
    """Registry hook: every kernel-choice option names one of its op's
    implementations, or "auto"."""
    for key, op in cls.kernel_ops.items():
      try:
        op.check(options.get(key, "auto"))
      except ValueError as e:
        raise OptionError(f"{cls.registered_name}: option {key}: {e}") from None

  def __call__(self, x: jax.Array, *, cache: Any = None,
               segment_ids: jax.Array | None = None):
    raise NotImplementedError

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> Any:
    raise NotImplementedError

  def flops_per_token(self, seq_len: int) -> float:
    """Forward model FLOPs per token, averaged over a causal sequence of
    length `seq_len` (matmuls count 2 per multiply-add)."""
    raise NotImplementedError

  # -- helpers for implementations ------------------------------------------

  def check_call(self, x: jax.Array, cache: Any, segment_ids: jax.Array | None):
    name = getattr(type(self), "registered_name", type(self).__name__)
    if x.ndim != 3:
      raise ValueError(f"{name}: expected x of shape [batch, length, d_model], "
                       f"got {x.shape}")
    if segment_ids is None:
      return
    if not self.info.supports_segments:
      raise ValueError(
          f"mixer {name!r} does not support packed sequences (segment_ids); "
          "use unpacked rows, or a mixer whose info.supports_segments is True")
    if cache is not None:
      raise ValueError(f"{name}: segment_ids are for full-sequence calls; the "
                       "incremental call takes one sequence per row")
    if segment_ids.shape != x.shape[:2]:
      raise ValueError(f"{name}: segment_ids shape {segment_ids.shape} must be "
                       f"[batch, length] = {x.shape[:2]}")


def state_bytes(module: Any, context: int, dtype=None) -> int:
  """Bytes of decode state one sequence holds after `context` tokens,
  measured from the cache `module.init_cache` allocates, not declared.

  `module` is a mixer or anything with `init_cache(batch_size, max_len,
  dtype)` (a whole `arches.lm.DecoderLM`); `dtype` None keeps the module's
  own default (a model's compute dtype). The cache for two sequences minus
  the cache for one, so counters shared by the batch (a cache's `pos`) do
  not count. Shapes only (`jax.eval_shape`): nothing is allocated, so a
  long context costs nothing to measure.
  """
  def total(batch_size: int) -> int:
    args = (batch_size, context) if dtype is None else (batch_size, context, dtype)
    shapes = jax.eval_shape(lambda: module.init_cache(*args))
    return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
               for s in jax.tree.leaves(shapes))
  return total(2) - total(1)


def check_room(pos: jax.Array, length: int, max_len: int, who: str) -> None:
  """Raise if `length` more tokens cannot fit after `pos` (when knowable)."""
  if length > max_len:
    raise ValueError(f"{who}: a piece of {length} tokens exceeds the cache "
                     f"max_len={max_len}")
  if not isinstance(pos, jax.core.Tracer):
    p = int(pos)
    if p + length > max_len:
      raise ValueError(f"{who}: cache holds {p} of max_len={max_len} tokens; "
                       f"{length} more do not fit. Allocate a larger cache "
                       "with init_cache(batch_size, max_len=...)")


def poison_overflow(y: jax.Array, pos: jax.Array, length: int,
                    max_len: int) -> jax.Array:
  """NaN outputs when a traced call overflows the cache (see module doc)."""
  return jnp.where(pos + length > max_len, jnp.nan, y).astype(y.dtype)


def positions_for(x: jax.Array, start: jax.Array | int = 0) -> jax.Array:
  """Absolute positions [B, L] int32 of a piece starting at `start`."""
  B, L = x.shape[:2]
  return jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
