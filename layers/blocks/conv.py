"""The causal short convolution that Mamba, Mamba-2, Griffin, H3, Hyena
and BaseConv put in front of their mixing, and the input history that
decodes their long convolutions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.kernels.conv1d import causal_conv1d
from layers.kernels.fftconv import conv_rows
from layers.params import Init, constant_init, fan_in_init, param

# Jitted so an eager call compiles one program rather than a slice per tap.
_conv1d = jax.jit(causal_conv1d)


class ShortConv(nnx.Module):
  """Depthwise causal convolution over time, per channel of a (possibly
  multi-axis) channel shape:

    y_t = b + sum_{k<width} w_k x_{t-width+1+k}

  w_{width-1} weighs the current input (the `layers.kernels.conv1d`
  convention; PyTorch's depthwise Conv1d weight [C, 1, K] is `weight.T`).
  The decode state is the last width-1 inputs. Accumulates in fp32 and
  returns x's dtype; no activation (callers apply theirs).

  Parameters: weight [width, *channels] (truncated normal, std
  scale / sqrt(width)); bias [*channels] from `bias_init` (zeros by
  default), absent with use_bias=False.
  """

  def __init__(self, channels: int | tuple[int, ...], width: int, *,
               rngs: nnx.Rngs, axes: tuple[str | None, ...],
               use_bias: bool = True, scale: float = 1.0,
               bias_init: Init | None = None):
    if width < 1:
      raise ValueError(f"convolution width must be >= 1, got {width}")
    channels = (channels,) if isinstance(channels, int) else tuple(channels)
    if len(axes) != len(channels):
      raise ValueError(f"axes {axes} must name each of the channel axes "
                       f"{channels}")
    self.width = width
    self.weight = param(rngs, fan_in_init(width, scale), (width,) + channels,
                        ("conv",) + tuple(axes))
    self.bias = (param(rngs, bias_init or constant_init(0.0), channels, axes)
                 if use_bias else None)

  def __call__(self, x: jax.Array, state: jax.Array | None = None,
               segment_ids: jax.Array | None = None):
    """x [B, L, *channels]; state [B, width-1, *channels] (zeros when
    None); segment_ids [B, L] for packed rows (taps stop at a segment
    start; not with state). Returns y like x and the new state."""
    flat = lambda a: a.reshape(a.shape[:2] + (-1,))
    bias = None if self.bias is None else self.bias[...].reshape(-1)
    y, state = _conv1d(flat(x), self.weight[...].reshape(self.width, -1), bias,
                       None if state is None else flat(state),
                       segment_ids=segment_ids)
    return y.reshape(x.shape), state.reshape(state.shape[:2] + x.shape[2:])

  def init_state(self, batch_size: int, dtype) -> jax.Array:
    return jnp.zeros((batch_size, self.width - 1) + self.weight.shape[1:], dtype)

  def flops_per_token(self) -> float:
    return 2.0 * self.weight.size


@struct.dataclass
class ConvHistory:
  """Every input so far of causal long convolutions whose filters reach
  back to the first token (Hyena, BaseConv's long layers), so decoding is
  exact: inputs [B, max_len, *C] fp32, where C may stack several
  convolutions (Hyena's [levels, d]); pos: int32 scalar, tokens seen.
  Each new token costs O(max_len) per channel (`conv_rows`).
  """
  inputs: jax.Array
  pos: jax.Array

  @property
  def max_len(self) -> int:
    return self.inputs.shape[1]

  @classmethod
  def zeros(cls, batch_size: int, max_len: int,
            channels: tuple[int, ...]) -> "ConvHistory":
    return cls(jnp.zeros((batch_size, max_len) + channels, jnp.float32),
               jnp.zeros((), jnp.int32))

  def convolve(self, u_BxLxC: jax.Array, k: jax.Array, *index: int):
    """Writes u's L new inputs at pos (into the stacked convolution at
    `index` of C's leading axes, when given) and returns the causal
    convolution of all inputs so far with k [>=max_len, *C'] at those L
    positions, fp32, and the history holding them. pos stays: `advance`
    once every stacked convolution has its inputs."""
    u = u_BxLxC.reshape(u_BxLxC.shape[:2] + (1,) * len(index)
                        + u_BxLxC.shape[2:])
    start = (0, self.pos) + index + (0,) * (u_BxLxC.ndim - 2)
    inputs = jax.lax.dynamic_update_slice(self.inputs, u, start)
    rows = self.pos + jnp.arange(u.shape[1])
    y = conv_rows(inputs[(slice(None), slice(None)) + index], k, rows)
    return y, self.replace(inputs=inputs)

  def advance(self, length: int) -> "ConvHistory":
    return self.replace(pos=self.pos + length)
