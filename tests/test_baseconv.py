"""BaseConv (`baseconv`, `baseconv_long`) against numpy float64
transcriptions of the reference forwards (HazyResearch/based
based/models/mixers/convolution.py and HazyResearch/zoology
zoology/mixers/base_conv.py + convolution.py), written here from the
reference code without sharing a code path with the mixers."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import mixers
from train import configs
from mixer_contract import CHECKS, full, rel_err, run_pieces

D, L = 16, 12
RTOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(name, **options):
  return mixers.build(name, D, rngs=nnx.Rngs(0), **options)


def inputs(seed=0, length=L):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((2, length, D)),
                     jnp.float32)


def f64(a):
  return np.asarray(a, np.float64)


def silu(a):
  return a / (1 + np.exp(-a))


def torch_causal_conv(a, weight_CxK, bias):
  """nn.Conv1d(C, C, K, groups=C, padding=K-1)(a^T)[..., :L]^T: pad K-1
  zeros on both sides, cross-correlate each channel, keep the first L."""
  C, K = weight_CxK.shape
  n = a.shape[1]
  padded = np.pad(a, ((0, 0), (K - 1, K - 1), (0, 0)))
  out = np.stack([sum(padded[:, t + j] * weight_CxK[:, j] for j in range(K))
                  for t in range(n + K - 1)], axis=1)
  return out[:, :n] + (0.0 if bias is None else bias)


def conv_weight(m):
  """The mixer's taps as PyTorch's depthwise weight [C, K] and bias."""
  taps = f64(m.conv.weight[...])
  bias = None if m.conv.bias is None else f64(m.conv.bias[...])
  return taps.reshape(taps.shape[0], -1).T, bias


def dense(module, u):
  w = f64(module.kernel[...])
  y = np.tensordot(u, w, axes=(-1, 0))
  return y if module.bias is None else y + f64(module.bias[...])


def based_reference(m, x):
  """based BaseConv.forward: u = in_proj(u); u1, u2 = split(u, d_inner);
  v = silu(conv1(u1)) * u2; y = out_proj(v) (conv without bias)."""
  u = dense(m.in_proj, f64(x))                      # [B, L, 2, d_inner]
  w, b = conv_weight(m)
  return dense(m.out_proj, silu(torch_causal_conv(u[:, :, 0], w, b)) * u[:, :, 1])


def zoology_reference(m, x, conv):
  """zoology BaseConv.forward: y = act(conv(u)) * act(projection(u)) + u."""
  u = f64(x)
  act = silu if m.use_act else (lambda a: a)
  return act(conv(u)) * act(dense(m.proj, u)) + u


def zoology_short_reference(m, x):
  return zoology_reference(m, x, lambda u: torch_causal_conv(u, *conv_weight(m)))


def implicit_filter_reference(m, length):
  """ImplicitLongConvolution.filter(l): mlp(PositionalEmbedding(d_emb,
  l_max).z[:, :l]) with z = [linspace(0, 1, l_max), Re, Im of
  exp(-i f 2 pi t / l_max)], t = 0 .. l_max - 1; mlp = Linear, ReLU, Linear."""
  f_ = m.filter
  l_max, bands = f_.scale, f_.bands
  t = np.linspace(0, 1, l_max)[:, None]
  w = 2 * np.pi * np.linspace(0, l_max - 1, l_max)[:, None] / l_max
  f = np.linspace(1e-4, bands - 1, bands)[None]
  z = np.exp(-1j * f * w)
  z = np.concatenate([t, z.real, z.imag], axis=-1)[:length]
  return dense(f_.out, np.maximum(dense(f_.hidden, z), 0.0))   # [l, d]


def zoology_long_reference(m, x):
  """fft_conv(u, k): rfft at 2L, k_f / 2L, irfft(norm="forward"), first L,
  plus u (gelu=False)."""
  def conv(u):
    n = u.shape[1]
    k = implicit_filter_reference(m, n)
    k_f = np.fft.rfft(k, n=2 * n, axis=0) / (2 * n)
    u_f = np.fft.rfft(u, n=2 * n, axis=1)
    return np.fft.irfft(u_f * k_f, n=2 * n, axis=1, norm="forward")[:, :n] + u
  return zoology_reference(m, x, conv)


CASES = {
    "based": ("baseconv", {}, based_reference),
    "based_expand4_k4": ("baseconv", {"expand": 4, "kernel_size": 4},
                         based_reference),
    "zoology": ("baseconv", {"layout": "zoology"}, zoology_short_reference),
    "zoology_act": ("baseconv", {"layout": "zoology", "use_act": True},
                    zoology_short_reference),
    "long": ("baseconv_long", {"filter_scale": 32}, zoology_long_reference),
    "long_act": ("baseconv_long", {"filter_scale": 32, "use_act": True,
                                   "filter_pos_dim": 5}, zoology_long_reference),
}


def check_reference(m, x, reference):
  y = full(m, x)
  err = rel_err(y, reference(m, x))
  assert err <= RTOL, f"mixer vs reference transcription: rel err {err:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_and_decode_matches_full(case):
  name, options, reference = CASES[case]
  m = build(name, **options)
  x = inputs()
  check_reference(m, x, reference)
  # One piece length (one compile); the contract runs 1-token steps.
  y_inc, _ = run_pieces(m, x, [6, 6], L)
  assert rel_err(y_inc, full(m, x)) <= RTOL


class Delayed(nnx.Module):
  """Planted bug: a short convolution that reads one step too far back."""

  def __init__(self, conv):
    self.conv = conv
    self.weight, self.bias = conv.weight, conv.bias

  def __call__(self, x, state=None, segment_ids=None):
    y, state = self.conv(x, state, segment_ids)
    return jnp.pad(y, ((0, 0), (1, 0)) + ((0, 0),) * (y.ndim - 2))[:, :-1], state


class LateFilter(nnx.Module):
  """Planted bug: the long filter one tap late (h(i + 1) at lag i)."""

  def __init__(self, filter_):
    self.filter = filter_
    self.scale, self.bands = filter_.scale, filter_.bands
    self.hidden, self.out = filter_.hidden, filter_.out

  def __call__(self, length):
    return self.filter(length + 1)[1:]


@pytest.mark.parametrize("case,attr,planted", [
    ("based", "conv", Delayed), ("zoology", "conv", Delayed),
    ("long", "filter", LateFilter)])
def test_reference_check_catches_a_one_step_shift(case, attr, planted):
  name, options, reference = CASES[case]
  m = build(name, **options)
  setattr(m, attr, planted(getattr(m, attr)))
  with pytest.raises(AssertionError, match="reference"):
    check_reference(m, inputs(), reference)


@pytest.mark.parametrize("check", ["packed", "gradients", "bf16"])
def test_zoology_layout_passes_the_contract(check):
  # The contract suite runs the default (based) layout; here the checks the
  # reference tests above do not cover, for the other one.
  CHECKS[check](lambda seed: mixers.build(
      "baseconv", 32, rngs=nnx.Rngs(seed), layout="zoology", use_act=True))


def test_packed_rows_restart_the_convolution():
  m = build("baseconv", kernel_size=4)
  x = inputs()
  seg = jnp.asarray([[0] * 5 + [1] * 7] * 2, jnp.int32)
  y = full(m, x, seg)
  ref = jnp.concatenate([full(m, x[:, :5]), full(m, x[:, 5:])], axis=1)
  assert rel_err(y, ref) <= RTOL


def test_long_filter_is_defined_past_filter_scale():
  m = build("baseconv_long", filter_scale=4)
  x = inputs()
  y = full(m, x)
  assert np.isfinite(np.asarray(y)).all()
  y_inc, _ = run_pieces(m, x, [7, 5], L)
  assert rel_err(y_inc, y) <= RTOL


@pytest.mark.parametrize("name,options,match", [
    ("baseconv", {"layout": "hyena"}, r"layout 'hyena'.*based"),
    ("baseconv", {"kernel_size": 0}, "kernel_size"),
    ("baseconv", {"expand": 0}, "expand"),
    ("baseconv", {"layout": "zoology", "expand": 4}, "expand=4 applies to layout='based'"),
    ("baseconv", {"use_act": True}, "use_act applies to layout='zoology'"),
    ("baseconv_long", {"filter_pos_dim": 4}, "filter_pos_dim"),
    ("baseconv_long", {"filter_scale": 1}, "filter_scale"),
    ("baseconv_long", {"filter_width": 0}, "filter_width"),
    ("baseconv_long", {"kernel": "winograd"}, "kernel"),
])
def test_bad_options_name_the_problem(name, options, match):
  with pytest.raises(ValueError, match=match):
    build(name, **options)


def test_long_refuses_packed_rows():
  m = build("baseconv_long")
  with pytest.raises(ValueError, match="segment"):
    m(inputs(), segment_ids=jnp.zeros((2, L), jnp.int32))


def test_based_hybrid_places_layers_as_the_reference_model():
  """configs/hybrids/based.yaml cycled over 25 layers puts linear attention
  and sliding windows where based-360m.yaml has them (its first 25)."""
  cfg = configs.load(os.path.join(ROOT, "configs", "hybrids", "based.yaml"),
                     ["model.n_layers=25"])
  names = [name for name, _ in cfg.model.mixer_specs()]
  where = lambda n: [i for i, m in enumerate(names) if m == n]
  assert where("based") == [1, 6, 11, 16, 21]
  assert where("sliding_window") == [2, 7, 12, 17, 22]
  assert set(names) == {"baseconv", "based", "sliding_window"}
