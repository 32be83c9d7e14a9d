"""Mixture-of-experts channel mixer ("moe").

    cm = channel.build("moe", 64, rngs=nnx.Rngs(0), num_experts=8, top_k=2)
    y = cm(x)                       # [B, L, D] -> [B, L, D]
    y, aux = cm.with_aux(x)         # plus MoEAux: auxiliary losses, statistics
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.channel import (ChannelInfo, ChannelMixer, MLP, NoState, SwiGLU,
                            _hidden, register)
from layers.channel import dispatch as dispatch_lib
from layers.channel import routers
from layers.channel.experts import EXPERT_KINDS, GROUPED, Experts
from layers.params import Dense
from layers.registry import options_of

F32 = jnp.float32


class BalanceBias(nnx.Variable):
  """DeepSeek-V3's per-expert routing bias: not a parameter (no gradient,
  no optimizer); the train step moves it towards balance after each step,
  and it is checkpointed with the rest of the train state."""


@struct.dataclass
class MoEAux:
  """What one MoE layer returns besides its output: `loss`, the weighted
  auxiliary loss to add to the training loss (balance_weight *
  balance_loss + z_weight * z_loss), and the router's statistics."""
  loss: jax.Array
  stats: routers.RouterStats


@register("moe")
class MoE(ChannelMixer):
  """Mixture of experts (Shazeer et al. 2017, "Outrageously Large Neural
  Networks", arXiv:1701.06538): y = sum_{e in chosen(x)} g_e(x) E_e(x)
  (+ shared(x)), a router choosing a few of `num_experts` expert MLPs per
  token; parameters grow with E, compute with the chosen (active) experts.

  Routers (`router`, layers/channel/routers.py): softmax_topk (Switch with
  top_k 1, Fedus et al. 2021, arXiv:2101.03961; GShard with top_k 2 and
  normalize_gates, Lepikhin et al. 2020, arXiv:2006.16668), topk_softmax
  (Mixtral, arXiv:2401.04088), sigmoid_bias (DeepSeek-V3's sigmoid scores
  with the auxiliary-loss-free balancing bias, arXiv:2412.19437; the bias
  is a `BalanceBias` moved by `update_balance` outside the gradient, by
  bias_update_rate per step), expert_choice (Zhou et al. 2022,
  arXiv:2202.09368; not causal, refused in a causal LM, no decode).
  DeepSeekMoE (Dai et al. 2024, arXiv:2401.06066) is fine-grained experts
  (many small ones, larger top_k) plus `shared_hidden` > 0: K_s always-on
  shared experts of hidden h are one MLP of hidden K_s * h. `shared_gate`
  scales it by sigmoid(w . x) (Qwen2-MoE's shared-expert gate).

  Router logits and gates are fp32 whatever the compute dtype (a bf16
  softmax over experts flips near-tied choices). Experts are SwiGLU or GELU
  MLPs (`expert`) of hidden `hidden` (default mult * d_model).

  Dispatch (layers/channel/dispatch.py): "dropless" (sorted by expert,
  grouped matmuls; cost of the active parameters; `kernel` picks the
  grouped matmul, `tile` caps its tile rows), "capacity" (each expert takes
  at most ceil(capacity_factor * L * top_k / E) assignments of each row,
  in token order; the rest are dropped and ride the block's residual;
  expert parallelism runs this path), "dense" (every expert on every
  token: the reference). With a cache (decoding) nothing is dropped: the
  capacity becomes the piece length.

  Auxiliary losses (`with_aux`): Switch's load-balancing loss weighted by
  balance_weight and ST-MoE's router z-loss (Zoph et al. 2022,
  arXiv:2202.08906) weighted by z_weight; statistics: expert load,
  routing entropy, dropped fraction (`routers.RouterStats`).

  Cost per token: router 2 d E, plus top_k experts (expert choice: on
  average capacity_factor * top_k), plus the shared MLP. Departures: no
  router jitter noise, no DeepSeek-V3 node-limited routing; capacity
  priority is by token position (causal) rather than GShard's
  all-first-choices-first.
  """

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, num_experts: int = 8,
               top_k: int = 2, hidden: int | None = None, mult: float = 8 / 3,
               expert: str = "swiglu", router: str = "softmax_topk",
               normalize_gates: bool | None = None, route_scale: float = 1.0,
               dispatch: str = "dropless", capacity_factor: float = 1.25,
               balance_weight: float = 0.01, z_weight: float = 1e-3,
               bias_update_rate: float = 1e-3, shared_hidden: int = 0,
               shared_gate: bool = False, tile: int = 128, kernel: str = "auto"):
    check_options(num_experts=num_experts, top_k=top_k, router=router,
                  dispatch=dispatch, capacity_factor=capacity_factor,
                  expert=expert, kernel=kernel, tile=tile,
                  shared_hidden=shared_hidden, shared_gate=shared_gate)
    self.num_experts, self.top_k, self.router = num_experts, top_k, router
    # Switch/Qwen2-MoE leave softmax gates as they are; DeepSeek-V3
    # normalizes its sigmoid scores over the chosen experts.
    self.normalize_gates = (router == "sigmoid_bias" if normalize_gates is None
                            else normalize_gates)
    self.route_scale, self.dispatch = route_scale, dispatch
    self.capacity_factor, self.tile, self.kernel = capacity_factor, tile, kernel
    self.balance_weight, self.z_weight = balance_weight, z_weight
    self.bias_update_rate = bias_update_rate
    self.router_proj = Dense(d_model, num_experts, in_axes=("embed",),
                             out_axes=(None,), rngs=rngs)
    self.bias = (BalanceBias(jnp.zeros((num_experts,), F32), logical_axes=(None,))
                 if router == "sigmoid_bias" else None)
    self.experts = Experts(num_experts, d_model, _hidden(d_model, hidden, mult),
                           kind=expert, rngs=rngs)
    if shared_hidden:
      self.shared = (SwiGLU(d_model, rngs=rngs, hidden=shared_hidden)
                     if expert == "swiglu" else MLP(d_model, rngs=rngs, hidden=shared_hidden))
    else:
      self.shared = None
    self.shared_gate = (Dense(d_model, 1, in_axes=("embed",), out_axes=(None,),
                              rngs=rngs) if shared_gate else None)

  @classmethod
  def info_for(cls, **options) -> ChannelInfo:
    """Checks the options' values (so a config fails when it is loaded) and
    says whether the layer is causal."""
    full = {k: o.default for k, o in options_of(cls, ("d_model",)).items()}
    full.update(options)
    check_options(**full)
    return ChannelInfo(causal=full["router"] != "expert_choice")

  @property
  def info(self) -> ChannelInfo:
    return ChannelInfo(causal=self.router != "expert_choice")

  # -- routing -----------------------------------------------------------------

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """fp32 router logits [B, L, E]: the input and weights go in as fp32."""
    return jnp.einsum("bld,de->ble", x_BxLxD.astype(F32), self.router_proj.kernel[...])

  def capacity(self, length: int, decoding: bool) -> int | None:
    """Per-row capacity of the capacity dispatch and expert choice."""
    if decoding:
      return length
    if self.dispatch != "capacity" and self.router != "expert_choice":
      return None
    return dispatch_lib.capacity_of(length, self.top_k, self.num_experts,
                                    self.capacity_factor)

  def route(self, logits_BxLxE: jax.Array, capacity: int | None) -> routers.Routing:
    if self.router == "expert_choice":
      return routers.expert_choice(logits_BxLxE, capacity)
    return routers.token_choice(
        logits_BxLxE, self.router, self.top_k, normalize=self.normalize_gates,
        scale=self.route_scale, bias_E=None if self.bias is None else self.bias[...])

  # -- the layer ---------------------------------------------------------------

  def with_aux(self, x, *, segment_ids=None, decoding: bool = False):
    """(y, MoEAux). segment_ids change nothing: routing is per token, and a
    capacity group is a whole row, packed documents included."""
    del segment_ids
    B, L, _ = x.shape
    logits = self.logits(x)
    cap = self.capacity(L, decoding)
    r = self.route(logits, cap)
    w = self.experts.weights(x.dtype)
    if self.dispatch == "dense":
      y = dispatch_lib.dense(x, r, w)
    elif self.dispatch == "capacity":
      y = dispatch_lib.capacity(x, r, w, cap)
    else:
      y = dispatch_lib.dropless(x, r, w, kernel=self.kernel, tile=self.tile)
    if self.router == "expert_choice":  # dropped: tokens no expert took
      taken = jnp.zeros((B, L), F32).at[jnp.arange(B)[:, None], r.token].set(1.0)
      dropped = 1.0 - jnp.mean(taken)
    else:
      dropped = dispatch_lib.dropped_fraction(
          r, cap if self.dispatch == "capacity" else None)
    if self.shared is not None:
      s = self.shared(x)
      if self.shared_gate is not None:
        s = s * jax.nn.sigmoid(self.shared_gate(x.astype(F32))).astype(x.dtype)
      y = y + s
    stats = routers.router_stats(logits, r, dropped)
    loss = self.balance_weight * stats.balance_loss + self.z_weight * stats.z_loss
    return y, MoEAux(loss, stats)

  def __call__(self, x, *, cache=None, segment_ids=None):
    if cache is not None and self.router == "expert_choice":
      raise ValueError(_NO_DECODE)
    y, _ = self.with_aux(x, segment_ids=segment_ids, decoding=cache is not None)
    return y if cache is None else (y, cache)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    if self.router == "expert_choice":
      raise ValueError(_NO_DECODE)
    return NoState()

  def update_balance(self, aux: MoEAux) -> None:
    """DeepSeek-V3's bias step from a batch's expert load (outside the
    gradient); nothing for the other routers."""
    if self.bias is not None:
      self.bias[...] = routers.balance_bias_update(self.bias[...], aux.stats.load,
                                                   self.bias_update_rate)

  def flops_per_token(self) -> float:
    """Active forward FLOPs per token: router, chosen experts, shared MLP."""
    active = self.top_k * (self.capacity_factor if self.router == "expert_choice" else 1.0)
    total = 2.0 * self.router_proj.kernel.size + active * self.experts.flops_per_token()
    if self.shared is not None:
      total += self.shared.flops_per_token()
    if self.shared_gate is not None:
      total += 2.0 * self.shared_gate.kernel.size
    return total


_NO_DECODE = ("moe: router='expert_choice' has no incremental (decoding) form: "
              "each expert picks its tokens from the whole sequence. Use a "
              f"token-choice router ({', '.join(routers.TOKEN_CHOICE)}) to decode.")


def _int_at_least(name: str, value, lo: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < lo:
    raise ValueError(f"moe: {name} must be an int >= {lo}, got {value!r}")


def check_options(*, num_experts, top_k, router, dispatch, capacity_factor,
                  expert, kernel, tile, shared_hidden, shared_gate, **_) -> None:
  """One clear error per bad option, before anything is built (the others
  need no check beyond their type, which the registry checks)."""
  _int_at_least("num_experts", num_experts, 1)
  _int_at_least("top_k", top_k, 1)
  _int_at_least("tile", tile, 1)
  _int_at_least("shared_hidden", shared_hidden, 0)
  if router not in routers.ROUTERS:
    raise ValueError(f"moe: unknown router {router!r}; choose one of "
                     f"{list(routers.ROUTERS)}")
  if top_k > num_experts:
    raise ValueError(f"moe: top_k={top_k} is larger than num_experts="
                     f"{num_experts}; top_k must be between 1 and num_experts")
  if dispatch not in dispatch_lib.DISPATCHES:
    raise ValueError(f"moe: unknown dispatch {dispatch!r}; choose one of "
                     f"{list(dispatch_lib.DISPATCHES)}")
  if not capacity_factor > 0:
    raise ValueError(f"moe: capacity_factor must be > 0, got {capacity_factor!r}")
  if expert not in EXPERT_KINDS:
    raise ValueError(f"moe: unknown expert {expert!r}; choose one of "
                     f"{list(EXPERT_KINDS)}")
  if kernel != "auto" and kernel not in GROUPED.names():
    raise ValueError(f"moe: unknown kernel {kernel!r}; choose 'auto' or one of "
                     f"{GROUPED.names()}")
  if router == "expert_choice" and dispatch == "dropless":
    raise ValueError("moe: router='expert_choice' gives every expert a fixed "
                     "capacity, so it has no dropless dispatch; use dispatch="
                     "'capacity' (or 'dense', the reference)")
  if shared_gate and not shared_hidden:
    raise ValueError("moe: shared_gate=True needs a shared expert "
                     "(shared_hidden > 0)")
