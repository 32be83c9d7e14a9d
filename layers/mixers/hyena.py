"""Hyena: implicit long convolutions with data-controlled gating."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.blocks.conv import ConvHistory, ShortConv
from layers.blocks.ssm import normal_param
from layers.kernels.fftconv import CAUSAL_CONV, causal_conv, fft_conv_flops
from layers.mixers import register
from layers.mixers.base import (Mixer, MixerInfo, check_room, poison_overflow)
from layers.params import Dense, constant_init, fan_in_init, param


class ImplicitFilter(nnx.Module):
  """h(t) = FFN(z(t)) * exp(-|delta| t / scale), defined for every t >= 0.

  z(t) = [t/scale, cos(2 pi f_b t/scale), -sin(2 pi f_b t/scale)] with
  f_b = linspace(1e-4, bands - 1, bands); FFN: Linear, then two
  (Linear, sin) pairs after the first sin, sin(freq * .) with a learned
  frequency shared by the three activations, and a final bias-free Linear to
  `channels`. delta is fixed per channel, spaced so the fastest channel
  decays to 1e-2 at t = 0.3 scale and the slowest at 1.5 scale (the
  reference code's ExponentialModulation, which trains it with lr 0).
  """

  def __init__(self, channels: tuple[int, int], *, rngs: nnx.Rngs,
               pos_dim: int, width: int, scale: int):
    if pos_dim < 3 or pos_dim % 2 == 0:
      raise ValueError(f"filter_pos_dim must be odd and >= 3 (time plus "
                       f"cos/sin bands), got {pos_dim}")
    if scale < 1:
      raise ValueError(f"filter_scale must be >= 1, got {scale}")
    self.bands, self.scale = (pos_dim - 1) // 2, scale
    self.inp = Dense(pos_dim, width, in_axes=(None,), out_axes=("mlp",),
                     rngs=rngs, use_bias=True)
    self.hidden1 = Dense(width, width, in_axes=("mlp",), out_axes=("mlp",),
                         rngs=rngs, use_bias=True)
    self.hidden2 = Dense(width, width, in_axes=("mlp",), out_axes=("mlp",),
                         rngs=rngs, use_bias=True)
    self.freq = param(rngs, constant_init(1.0), (width,), ("mlp",))
    self.outp = Dense(width, channels, in_axes=("mlp",), out_axes=(None, "embed"),
                      rngs=rngs)

  def __call__(self, length: int) -> jax.Array:
    """fp32 filter taps [length, *channels] for t = 0 .. length-1."""
    t = jnp.arange(length, dtype=jnp.float32)[:, None] / self.scale   # [L, 1]
    f = jnp.linspace(1e-4, self.bands - 1, self.bands, dtype=jnp.float32)
    angle = 2 * math.pi * f * t
    z = jnp.concatenate([t, jnp.cos(angle), -jnp.sin(angle)], axis=-1)
    act = lambda h: jnp.sin(self.freq[...] * h)
    h = self.outp(act(self.hidden2(act(self.hidden1(act(self.inp(z)))))))
    D = h.shape[-1]
    target = math.log(1e-2)
    delta = jnp.linspace(target / 1.5, target / 0.3, D, dtype=jnp.float32)
    return h * jnp.exp(-t[..., None] * jnp.abs(delta))

  def flops_per_position(self) -> float:
    return 2.0 * sum(m.kernel.size for m in
                     (self.inp, self.hidden1, self.hidden2, self.outp))


@struct.dataclass
class HyenaCache:
  """conv: the last short_len - 1 projected inputs [B, short_len-1,
  order+1, d] (activation dtype); history: every input so far of each long
  convolution, stacked [order-1, d], and the tokens seen (`ConvHistory`)."""
  conv: jax.Array
  history: ConvHistory


@register("hyena")
class Hyena(Mixer):
  """Hyena (Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon & Re,
  2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models",
  arXiv:2302.10866).

  (x_0, ..., x_{N-1}, v) = ShortConv(x W_in)   (depthwise causal, short_len)
  z = v;  for n = N-1, ..., 1:  z = h_n * (x_n z) + b_n (x_n z)
  y = (x_0 z) W_out
  with N = `order` and h_n long implicit filters (`ImplicitFilter`: a
  positional FFN with sin activations, exponentially modulated), evaluated
  at as many positions as needed, so the layer is defined for any length.
  `order` counts as in the reference code: N + 1 projections, N - 1 long
  convolutions (order 2 is the H3-like operator of the paper's
  experiments).

  Training: FFT causal convolution (zero-padded to 2L), O(d L log L) per
  filter, plus the filter FFN at L positions. Decode: the state grows
  with length: the cache keeps every input of each long convolution and
  each step sums the new outputs directly over that history, O(max_len d)
  per token and level, after re-evaluating the filter at max_len positions
  (a decode step costs as much as max_len filter positions; no
  recurrence is distilled). Filters and long convolutions are fp32 for
  any input dtype.

  Options: order N >= 2; filter_width (FFN width); filter_pos_dim (odd, the
  positional features: 1 + 2 bands); filter_scale (positions enter the
  filter as t / filter_scale, the reference code's l_max; filters are
  defined past it); short_len; kernel: "auto" or a
  `layers.kernels.fftconv.CAUSAL_CONV` impl.
  """

  info = MixerInfo(family="long_conv", paper="Poli et al. 2023, arXiv:2302.10866",
                   train_cost="n log n", decode_state="length",
                   supports_segments=False)
  kernel_ops = {"kernel": CAUSAL_CONV}

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, order: int = 2,
               filter_width: int = 64, filter_pos_dim: int = 5,
               filter_scale: int = 1024, short_len: int = 3,
               kernel: str = "auto"):
    if order < 2:
      raise ValueError(f"order must be >= 2 (order - 1 long convolutions), "
                       f"got {order}")
    self.order = order
    self.kernel = kernel
    self.in_proj = Dense(d_model, (order + 1, d_model), in_axes=("embed",),
                         out_axes=(None, "embed"), rngs=rngs, use_bias=True)
    self.short = ShortConv((order + 1, d_model), short_len, rngs=rngs,
                           axes=(None, "embed"),
                           bias_init=fan_in_init(short_len))
    self.filter = ImplicitFilter((order - 1, d_model), rngs=rngs,
                                 pos_dim=filter_pos_dim, width=filter_width,
                                 scale=filter_scale)
    self.bias = normal_param(rngs, (order - 1, d_model), (None, "embed"))
    self.out_proj = Dense(d_model, d_model, in_axes=("embed",),
                          out_axes=("embed",), rngs=rngs, use_bias=True)

  def _levels(self, u, long_conv):
    """The gated recurrence over the N - 1 levels; long_conv(level, z)."""
    z = u[:, :, self.order].astype(jnp.float32)
    for level in range(self.order - 1):
      z = z * u[:, :, self.order - 1 - level]
      z = long_conv(level, z) + self.bias[level] * z
    return z * u[:, :, 0]

  def __call__(self, x, *, cache=None, segment_ids=None):
    self.check_call(x, cache, segment_ids)
    L = x.shape[1]
    if cache is None:
      u, _ = self.short(self.in_proj(x))
      h = self.filter(L)
      z = self._levels(u, lambda n, z: causal_conv(z, h[:, n], self.kernel))
      return self.out_proj(z.astype(x.dtype))

    history = cache.history
    pos, max_len = history.pos, history.max_len
    check_room(pos, L, max_len, "hyena")
    u, conv_state = self.short(self.in_proj(x), cache.conv)
    h = self.filter(max_len)

    def long_conv(n, z):
      nonlocal history
      y, history = history.convolve(z, h[:, n], n)
      return y

    z = self._levels(u, long_conv)
    y = poison_overflow(self.out_proj(z.astype(x.dtype)), pos, L, max_len)
    return y, HyenaCache(conv_state, history.advance(L))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    d = self.out_proj.kernel.shape[0]
    return HyenaCache(self.short.init_state(batch_size, dtype),
                      ConvHistory.zeros(batch_size, max_len,
                                        (self.order - 1, d)))

  def flops_per_token(self, seq_len):
    d = self.out_proj.kernel.shape[0]
    levels = self.order - 1
    return (2.0 * (self.in_proj.kernel.size + self.out_proj.kernel.size)
            + self.short.flops_per_token() + self.filter.flops_per_position()
            + levels * d * (fft_conv_flops(seq_len) + 4.0) + 2.0 * d)
