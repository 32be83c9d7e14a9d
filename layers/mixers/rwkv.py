"""RWKV time mixing: RWKV-4 (per-channel WKV) and RWKV-6 "Finch"
(data-dependent decay, matrix state per head).

Both keep a constant decode state: the last token (for the token shift)
plus the WKV state in fp32. RWKV-4's WKV is `layers.kernels.wkv`; RWKV-6's
is the shared causal linear attention (`layers.kernels.linear_attention`)
run one token behind, plus the bonus term. Packed rows (segment_ids) shift
in zeros and empty the WKV state at each segment start.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.blocks.recurrent import GatedHeadNorm, RecurrentMixer, head_dense
from layers.blocks.shift import lerp, shift_ramp, token_shift
from layers.kernels import linear_attention as linear
from layers.kernels.wkv import WKV4, WKV4_FLOPS, WKV4State
from layers.mixers import register
from layers.mixers.base import MixerInfo
from layers.params import Dense, param
from layers.positions import segment_starts

# Channel ramps of the reference inits take a layer-depth ratio; a mixer
# does not know its depth, so it takes the middle of the stack.
DEPTH = 0.5


def channel_ramp(n: int) -> jax.Array:
  """i / (n - 1) for i < n (0 when n == 1)."""
  return jnp.arange(n, dtype=jnp.float32) / max(n - 1, 1)


@register("rwkv4")
class RWKV4(RecurrentMixer):
  """RWKV-4 time mixing (Peng et al., 2023, "RWKV: Reinventing RNNs for the
  Transformer Era", arXiv:2305.13048).

  Token shift: k, v, r are projections of lerp(x_{t-1}, x_t, mu_{k,v,r}).
  WKV with per-channel decay w = -exp(time_decay) and bonus u = time_first:

    wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
          / (sum_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t})
    y_t   = W_o (sigmoid(r_t) * wkv_t)

  Packed rows (segment_ids): zeros shift in and the WKV state starts empty
  at each segment start.

  Cost: training O(L d) time with the recurrent form, O(L T d) with the
  chunked one (chunks of T tokens); decode O(d) per token with a constant
  state of 4 d values (last token, num, den, max; WKV in fp32). The cache
  is a `RecurrentCache` whose state is (last token, WKV4State).

  Options: kernel: "auto" or one of `layers.kernels.wkv.WKV4.names()`.
  """

  info = MixerInfo(family="rnn", paper="Peng et al. 2023, arXiv:2305.13048",
                   train_cost="linear", decode_state="constant",
                   supports_segments=True)
  kernel_ops = {"kernel": WKV4}

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, kernel: str = "auto"):
    self.kernel = kernel
    ramp = channel_ramp(d_model)
    self.time_decay = param(rngs, -5 + 8 * ramp ** (0.7 + 1.3 * DEPTH),
                            (d_model,), ("embed",))
    zigzag = 0.5 * ((jnp.arange(d_model) + 1) % 3 - 1)
    self.time_first = param(rngs, math.log(0.3) + zigzag, (d_model,), ("embed",))
    mu = lambda power, offset=0.0: param(rngs, shift_ramp(d_model, power, offset),
                                         (d_model,), ("embed",))
    self.mu_k = mu(1 - DEPTH)
    self.mu_v = mu(1 - DEPTH, 0.3 * DEPTH)
    self.mu_r = mu(0.5 * (1 - DEPTH))
    proj = lambda: Dense(d_model, d_model, in_axes=("embed",),
                         out_axes=("embed",), rngs=rngs)
    self.key, self.value, self.receptance, self.output = (
        proj(), proj(), proj(), proj())

  def mix(self, x, pos, segment_ids, state):
    last, wkv = state
    prev = token_shift(x, last, segment_ids)
    k = self.key(lerp(x, prev, self.mu_k[...]))
    v = self.value(lerp(x, prev, self.mu_v[...]))
    r = jax.nn.sigmoid(self.receptance(lerp(x, prev, self.mu_r[...])))
    impl = WKV4.choose(self.kernel, dtype=x.dtype)
    out, wkv = impl.fn(-jnp.exp(self.time_decay[...]), self.time_first[...],
                       k, v, wkv, resets(x, segment_ids))
    return self.output(r * out.astype(x.dtype)), (x[:, -1].astype(last.dtype), wkv)

  def zero_state(self, batch_size, dtype):
    d = self.time_decay.shape[0]
    return jnp.zeros((batch_size, d), dtype), WKV4State.zeros(batch_size, d)

  def flops_per_token(self, seq_len):
    d = self.time_decay.shape[0]
    impl = WKV4.choose(self.kernel)
    return 4 * 2.0 * d * d + WKV4_FLOPS[impl.name] * d


def resets(x_BxLxD, segment_ids):
  """[B, L] bool, True where the WKV state starts empty (segment starts);
  all False without segment_ids."""
  if segment_ids is None:
    return jnp.zeros(x_BxLxD.shape[:2], bool)
  return segment_starts(segment_ids)


def wkv6(r_BxLxHxK, k_BxLxHxK, v_BxLxHxV, logw_BxLxHxK, u_HxK, S_BxHxKxV, *,
         segment_ids=None, kernel: str, chunk_size: int):
  """RWKV-6's WKV, y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T) with
  S_t = diag(exp(logw_t)) S_{t-1} + k_t v_t^T, all in fp32.

  The shared linear attention reads the state that includes the current
  token (o_t = S_t^T q_t). Fed keys, values and log decays one token late
  (zeros at t = 0 and at segment starts), its state at t is our S_{t-1};
  the bonus adds the current token, and one last update gives the state
  after the piece. Returns (y [B, L, H, V] fp32, S [B, H, K, V] fp32).
  """
  f32 = lambda a: a.astype(jnp.float32)
  late = lambda a: token_shift(f32(a), None, segment_ids)
  o, S = linear.causal_linear_attention(
      r_BxLxHxK, late(k_BxLxHxK), late(v_BxLxHxV), log_decay=late(logw_BxLxHxK),
      segment_ids=segment_ids, state=S_BxHxKxV, form=kernel,
      chunk_size=chunk_size)
  k, v = f32(k_BxLxHxK), f32(v_BxLxHxV)
  bonus = jnp.einsum("blhk,hk,blhk->blh", f32(r_BxLxHxK), f32(u_HxK), k)
  S = (jnp.exp(f32(logw_BxLxHxK[:, -1]))[..., None] * S
       + k[:, -1, :, :, None] * v[:, -1, :, None, :])
  return o + bonus[..., None] * v, S


# Order of the five data-dependent token shifts (ddlerp) of RWKV-6.
SHIFTS = ("w", "k", "v", "r", "g")


@register("rwkv6")
class RWKV6(RecurrentMixer):
  """RWKV-6 "Finch" time mixing (Peng et al., 2024, "Eagle and Finch: RWKV
  with Matrix-Valued States and Dynamic Recurrence", arXiv:2404.05892).

  Data-dependent token shift (ddlerp, one low-rank LoRA shared by five
  outputs): m = tanh(lerp(x_{t-1}, x_t, mu_x) A) B_s, x_s = lerp(x_{t-1},
  x_t, mu_s + m_s) for s in w, k, v, r, g. Data-dependent decay
  w_t = exp(-exp(d + tanh(x_w D1) D2)) per key channel. Per head (size K),
  a matrix state:

    y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),  S_t = diag(w_t) S_{t-1} + k_t v_t^T
    out = W_o (GroupNorm_heads(y) * silu(W_g x_g))

  Packed rows (segment_ids): zeros shift in and the state starts empty at
  each segment start.

  Cost: training O(L C d) time with the chunked form (chunks of C tokens),
  O(L d K) with the recurrent one; decode O(d K) per token with a constant
  state of d K + d values (WKV state in fp32, decays summed in fp32). The
  cache is a `RecurrentCache` whose state is (last token, S).

  Options: head_dim (K, default the paper's 64), mix_rank / decay_rank
  (LoRA ranks, the paper's 32 / 64); kernel ("auto", "chunked", "parallel",
  "recurrent", or a Pallas kernel on TPU/GPU) and chunk_size of the shared linear-attention kernel.
  """

  info = MixerInfo(family="rnn", paper="Peng et al. 2024, arXiv:2404.05892",
                   train_cost="linear", decode_state="constant",
                   supports_segments=True,
                   tensor_parallel=True)
  kernel_ops = {"kernel": linear.LINEAR_ATTENTION}

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, head_dim: int = 64,
               mix_rank: int = 32, decay_rank: int = 64, kernel: str = "auto",
               chunk_size: int = 64):
    if head_dim < 1 or d_model % head_dim:
      raise ValueError(f"rwkv6: d_model={d_model} must be a positive multiple "
                       f"of head_dim={head_dim}")
    if mix_rank < 1 or decay_rank < 1:
      raise ValueError(f"rwkv6: mix_rank={mix_rank} and decay_rank="
                       f"{decay_rank} must be >= 1")
    if chunk_size < 1:
      raise ValueError(f"rwkv6: chunk_size must be >= 1, got {chunk_size}")
    self.kernel, self.chunk_size = kernel, chunk_size
    H, K = d_model // head_dim, head_dim
    self.num_heads, self.head_dim = H, K
    ramp = channel_ramp(d_model)
    # mu_s per shift (reference init: 1 - maa_s, since lerp runs the other way).
    powers = {"w": 1 - DEPTH, "k": 1 - DEPTH, "v": 1 - DEPTH,
              "r": 0.5 * (1 - DEPTH), "g": 0.5 * (1 - DEPTH)}
    mu = jnp.stack([shift_ramp(d_model, powers[s], 0.3 * DEPTH if s == "v" else 0.0)
                    for s in SHIFTS])
    self.mu_x = param(rngs, shift_ramp(d_model, 1 - DEPTH), (d_model,), ("embed",))
    # The reference decays only ".weight" matrices: the token-shift mixes,
    # their LoRA factors, the decay and the bonus are never decayed.
    self.mu = param(rngs, mu, (len(SHIFTS), d_model), (None, "embed"),
                    weight_decay=False)
    # Small random LoRA factors (the reference zero-inits one side; random
    # keeps every gradient non-zero from the first step).
    small = lambda s: lambda key, shape, dtype: jax.random.uniform(
        key, shape, dtype, -s, s)
    self.mix_a = param(rngs, small(1e-2), (d_model, len(SHIFTS), mix_rank),
                       ("embed", None, None), weight_decay=False)
    self.mix_b = param(rngs, small(1e-2), (len(SHIFTS), mix_rank, d_model),
                       (None, None, "embed"), weight_decay=False)
    self.decay = param(rngs, (-6 + 5 * ramp ** (0.7 + 1.3 * DEPTH)).reshape(H, K),
                       (H, K), ("heads", "head_dim"), weight_decay=False)
    self.decay_a = param(rngs, small(1e-2), (d_model, decay_rank), ("embed", None),
                         weight_decay=False)
    self.decay_b = param(rngs, small(1e-2), (decay_rank, H, K),
                         (None, "heads", "head_dim"), weight_decay=False)
    zigzag = 0.1 * ((jnp.arange(d_model) + 1) % 3 - 1)
    self.bonus = param(rngs, (DEPTH * (1 - ramp) + zigzag).reshape(H, K), (H, K),
                       ("heads", "head_dim"), weight_decay=False)
    self.receptance, self.key, self.value = (
        head_dense(d_model, H, K, rngs) for _ in range(3))
    # GroupNorm per head with the reference's eps, 1e-5 * head_size_divisor^2
    # (divisor 8), then the silu gate.
    self.out_gate = GatedHeadNorm(d_model, H, K, rngs=rngs, use_bias=False,
                                  eps=64e-5)
    self.output = Dense((H, K), d_model, in_axes=("heads", "head_dim"),
                        out_axes=("embed",), rngs=rngs)

  def ddlerp(self, x, prev):
    """The five data-dependently shifted inputs, [B, L, 5, D]."""
    lo = jnp.tanh(jnp.einsum("bld,dsr->blsr", lerp(x, prev, self.mu_x[...]),
                             self.mix_a[...].astype(x.dtype)))
    m = jnp.einsum("blsr,srd->blsd", lo, self.mix_b[...].astype(x.dtype))
    return lerp(x[:, :, None], prev[:, :, None], self.mu[...] + m)

  def log_decay(self, x_w):
    """log w_t = -exp(d + tanh(x_w D1) D2) in fp32, [B, L, H, K]."""
    lo = jnp.tanh(x_w.astype(jnp.float32) @ self.decay_a[...])
    return -jnp.exp(self.decay[...] + jnp.einsum("blr,rhk->blhk", lo,
                                                 self.decay_b[...]))

  def mix(self, x, pos, segment_ids, state):
    last, S = state
    prev = token_shift(x, last, segment_ids)
    x_w, x_k, x_v, x_r, x_g = (self.ddlerp(x, prev)[:, :, i]
                               for i in range(len(SHIFTS)))
    y, S = wkv6(self.receptance(x_r), self.key(x_k), self.value(x_v),
                self.log_decay(x_w), self.bonus[...], S, segment_ids=segment_ids,
                kernel=self.kernel, chunk_size=self.chunk_size)
    return self.output(self.out_gate(x_g, y)), (x[:, -1].astype(last.dtype), S)

  def zero_state(self, batch_size, dtype):
    H, K = self.num_heads, self.head_dim
    return (jnp.zeros((batch_size, H * K), dtype),
            jnp.zeros((batch_size, H, K, K), jnp.float32))

  def flops_per_token(self, seq_len):
    d = self.num_heads * self.head_dim
    lora = self.mix_a.size + self.mix_b.size + self.decay_a.size + self.decay_b.size
    kernel = self.num_heads * linear.flops_per_token(
        linear.LINEAR_ATTENTION.choose(self.kernel).name, seq_len,
        self.chunk_size, self.head_dim, self.head_dim)
    return 5 * 2.0 * d * d + 2.0 * lora + kernel
