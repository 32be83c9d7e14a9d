"""BaseConv: the gated convolution of Zoology and Based, with a short causal
filter (`baseconv`) or Zoology's implicit long filter (`baseconv_long`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.blocks.conv import ConvHistory, ShortConv
from layers.kernels.fftconv import CAUSAL_CONV, causal_conv, fft_conv_flops
from layers.mixers import register
from layers.mixers.base import Mixer, MixerInfo, check_room, poison_overflow
from layers.params import Dense, fan_in_init

LAYOUTS = ("based", "zoology")


def zoology_gate(u, conv_u, proj_u, use_act: bool):
  """Zoology's BaseConv output u + act(conv(u)) * act(u W + b), act = SiLU
  when `use_act`, else the identity; in u's dtype."""
  act = jax.nn.silu if use_act else (lambda a: a)
  return u + act(conv_u.astype(u.dtype)) * act(proj_u)


def projection(d_model: int, rngs: nnx.Rngs) -> Dense:
  """Zoology's `projection`: nn.Linear(d_model, d_model) with bias."""
  return Dense(d_model, d_model, in_axes=("embed",), out_axes=("embed",),
               rngs=rngs, use_bias=True)


def check_positive(who: str, **options) -> None:
  for name, value in options.items():
    if value < 1:
      raise ValueError(f"{who}: option {name} must be >= 1, got {value}")


@struct.dataclass
class ConvCache:
  """conv: the last kernel_size - 1 inputs of the convolution [B,
  kernel_size - 1, channels] (activation dtype): a constant state."""
  conv: jax.Array


@register("baseconv")
class BaseConv(Mixer):
  """BaseConv (Arora, Eyuboglu, Timalsina, Johnson, Poli, Zou, Rudra & Re,
  2023, "Zoology: Measuring and Improving Recall in Efficient Language
  Models", arXiv:2312.04927), the gated convolution the Based models
  (Arora et al. 2024, arXiv:2402.18668) interleave with linear and
  sliding-window attention: a linear projection gates a short causal
  depthwise convolution of kernel_size taps,
  conv(a)_t = sum_{j<kernel_size} w_j a_{t-kernel_size+1+j} (+ b).

  layout="based" (HazyResearch/based, based/models/mixers/convolution.py,
  `BaseConv`: the layer of the released Based models):
    (a, g) = u W_in + b_in        (d -> 2 x d_inner, d_inner = expand d / 2)
    y = (SiLU(conv(a)) * g) W_out + b_out       (conv without bias)
  layout="zoology" (HazyResearch/zoology, zoology/mixers/base_conv.py,
  `BaseConv` with a kernel_size >= 1):
    y = u + act(conv(u)) * act(u W + b)         (conv with bias)
  with act = SiLU when use_act, else the identity. The "+ u" is the
  reference's own skip, inside the layer (the block adds its residual too).

  Cost: O(L d (d + kernel_size)) training time, linear in L; decode O(d^2)
  per token with a constant state of kernel_size - 1 inputs per channel
  (d_inner channels for "based", d for "zoology").

  Departures: initialization is this library's (truncated normal, std
  1/sqrt(fan_in); zero projection biases), not PyTorch's uniform default.

  Options: layout; kernel_size (reference 3); expand ("based" only; the
  reference default 2 gives d_inner = d, the Based models use 4); use_act
  ("zoology" only).
  """

  info = MixerInfo(family="conv", paper="Arora et al. 2023, arXiv:2312.04927; "
                   "Arora et al. 2024, arXiv:2402.18668", train_cost="linear",
                   decode_state="constant", supports_segments=True)

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, layout: str = "based",
               kernel_size: int = 3, expand: int = 2, use_act: bool = False):
    if layout not in LAYOUTS:
      raise ValueError(f"baseconv: unknown layout {layout!r}; choose one of "
                       f"{LAYOUTS}")
    check_positive("baseconv", kernel_size=kernel_size, expand=expand)
    if layout == "zoology" and expand != 2:
      raise ValueError(f"baseconv: expand={expand} applies to layout='based' "
                       "(its in/out projections); layout='zoology' has none")
    if layout == "based" and use_act:
      raise ValueError("baseconv: use_act applies to layout='zoology'; "
                       "layout='based' always applies SiLU to the convolution")
    if layout == "based" and expand * d_model % 2:
      raise ValueError(f"baseconv: expand * d_model = {expand * d_model} must "
                       "be even (split into the convolved and gate halves)")
    self.layout, self.use_act = layout, use_act
    if layout == "based":
      d_inner = expand * d_model // 2
      self.in_proj = Dense(d_model, (2, d_inner), in_axes=("embed",),
                           out_axes=(None, "mlp"), rngs=rngs, use_bias=True)
      self.conv = ShortConv((d_inner,), kernel_size, rngs=rngs, axes=("mlp",),
                            use_bias=False)
      self.out_proj = Dense(d_inner, d_model, in_axes=("mlp",),
                            out_axes=("embed",), rngs=rngs, use_bias=True)
    else:
      self.proj = projection(d_model, rngs)
      self.conv = ShortConv((d_model,), kernel_size, rngs=rngs,
                            axes=("embed",), use_bias=True,
                            bias_init=fan_in_init(kernel_size))

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    state = None if cache is None else cache.conv
    if self.layout == "based":
      h_BxLx2xI = self.in_proj(x)
      c, state = self.conv(h_BxLx2xI[:, :, 0], state, segment_ids)
      y = self.out_proj(jax.nn.silu(c) * h_BxLx2xI[:, :, 1])
    else:
      c, state = self.conv(x, state, segment_ids)
      y = zoology_gate(x, c, self.proj(x), self.use_act)
    return y if cache is None else (y, ConvCache(state))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    del max_len  # the state does not grow with length
    return ConvCache(self.conv.init_state(batch_size, dtype))

  def flops_per_token(self, seq_len):
    channels = math.prod(self.conv.weight.shape[1:])
    if self.layout == "based":
      dense = self.in_proj.kernel.size + self.out_proj.kernel.size
      return 2.0 * dense + self.conv.flops_per_token() + channels
    # the gate's product and the skip's sum
    return 2.0 * self.proj.kernel.size + self.conv.flops_per_token() + 2.0 * channels


class ImplicitLongFilter(nnx.Module):
  """Zoology's implicit long filter (`ImplicitLongConvolution`):
  h(i) = W_2 ReLU(W_1 z(i) + b_1) + b_2 per channel, with positional
  features z(i) = [i / (scale - 1), cos(f_j w_i), -sin(f_j w_i)], w_i =
  2 pi i / scale, f = linspace(1e-4, bands - 1, bands), bands = (pos_dim -
  1) / 2. The reference evaluates z at i < l_max (its `scale`); the same
  formula defines h at every i >= 0, so any length works here.
  """

  def __init__(self, channels: int, *, rngs: nnx.Rngs, pos_dim: int,
               width: int, scale: int):
    if pos_dim < 3 or pos_dim % 2 == 0:
      raise ValueError(f"baseconv_long: filter_pos_dim must be odd and >= 3 "
                       f"(time plus cos/sin bands), got {pos_dim}")
    if scale < 2:
      raise ValueError(f"baseconv_long: filter_scale must be >= 2, got {scale}")
    check_positive("baseconv_long", filter_width=width)
    self.bands, self.scale = (pos_dim - 1) // 2, scale
    self.hidden = Dense(pos_dim, width, in_axes=(None,), out_axes=("mlp",),
                        rngs=rngs, use_bias=True)
    self.out = Dense(width, channels, in_axes=("mlp",), out_axes=("embed",),
                     rngs=rngs, use_bias=True)

  def __call__(self, length: int) -> jax.Array:
    """fp32 taps [length, channels] for i = 0 .. length-1."""
    i = jnp.arange(length, dtype=jnp.float32)[:, None]            # [L, 1]
    f = jnp.linspace(1e-4, self.bands - 1, self.bands, dtype=jnp.float32)
    angle = f * (2 * math.pi / self.scale) * i
    z = jnp.concatenate([i / (self.scale - 1), jnp.cos(angle), -jnp.sin(angle)],
                        axis=-1)
    return self.out(jax.nn.relu(self.hidden(z)))

  def flops_per_position(self) -> float:
    return 2.0 * (self.hidden.kernel.size + self.out.kernel.size)


@register("baseconv_long")
class BaseConvLong(Mixer):
  """BaseConv with Zoology's implicit long filter (Arora et al. 2023,
  "Zoology", arXiv:2312.04927; HazyResearch/zoology,
  zoology/mixers/base_conv.py, `BaseConv` with kernel_size=-1 and
  implicit_long_conv=True, the long layers of Zoology's BaseConv baseline):

    c = h * u + u        (causal, per channel: sum_{s<=t} h(t-s) u_s, plus
                          the skip the reference's fft_conv adds)
    y = u + act(c) * act(u W + b),   act = SiLU when use_act, else identity

  with h the implicit filter of `ImplicitLongFilter` (an MLP of positional
  features, evaluated at as many positions as needed).

  Cost: training O(L log L d) by FFT convolution (zero-padded to 2L) plus
  the filter MLP at L positions and the O(L d^2) projection. Decode: the
  state grows with length: the cache keeps every input, and each step sums
  its outputs directly over that history, O(max_len d) per token, after
  evaluating the filter at max_len positions. The filter and convolution
  are fp32 for any input dtype. No packed sequences (the FFT convolution
  runs over the whole row).

  Departures: the filter is defined past filter_scale (the reference's
  l_max, where its filter stops); initialization is this library's.

  Options: use_act; filter_width (MLP width, reference 16);
  filter_pos_dim (odd: time plus cos/sin bands, reference 3); filter_scale
  (the reference's l_max: positions enter as i / (l_max - 1) and
  2 pi i / l_max); kernel: "auto" or a `layers.kernels.fftconv.CAUSAL_CONV`
  impl.
  """

  info = MixerInfo(family="long_conv", paper="Arora et al. 2023, "
                   "arXiv:2312.04927", train_cost="n log n",
                   decode_state="length", supports_segments=False)
  kernel_ops = {"kernel": CAUSAL_CONV}

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, use_act: bool = False,
               filter_width: int = 16, filter_pos_dim: int = 3,
               filter_scale: int = 2048, kernel: str = "auto"):
    self.use_act = use_act
    self.kernel = kernel
    self.proj = projection(d_model, rngs)
    self.filter = ImplicitLongFilter(d_model, rngs=rngs, pos_dim=filter_pos_dim,
                                     width=filter_width, scale=filter_scale)

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    L = x.shape[1]
    u = x.astype(jnp.float32)
    if cache is None:
      c = causal_conv(u, self.filter(L), self.kernel) + u
      return zoology_gate(x, c, self.proj(x), self.use_act)
    check_room(cache.pos, L, cache.max_len, "baseconv_long")
    c, history = cache.convolve(u, self.filter(cache.max_len))
    y = zoology_gate(x, c + u, self.proj(x), self.use_act)
    y = poison_overflow(y, cache.pos, L, cache.max_len)
    return y, history.advance(L)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    d = self.proj.kernel.shape[0]
    return ConvHistory.zeros(batch_size, max_len, (d,))

  def flops_per_token(self, seq_len):
    d = self.proj.kernel.shape[0]
    return (2.0 * self.proj.kernel.size + self.filter.flops_per_position()
            + d * (fft_conv_flops(seq_len) + 3.0))
