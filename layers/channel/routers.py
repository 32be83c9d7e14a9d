"""Routers of a mixture of experts: which experts see which tokens, with
what weight, and the statistics and auxiliary losses of that choice.

A router maps fp32 logits [B, L, E] (one row of tokens is one group) to
`Routing`: N assignments per row, each an (expert, token, gate, slot),
where slot is the assignment's rank among the row's assignments to that
expert in priority order (the capacity dispatch keeps slot < capacity).

Token choice (each token picks top_k experts), N = L * top_k, ordered by
token position, then by choice: a token's assignments only compete with
those of earlier tokens, so dropping over capacity stays causal (GShard
and Switch rank all first choices before any second choice, which lets a
later token's first choice push out an earlier token's second one).

  softmax_topk   p = softmax(logits); top_k of p; gate = p (renormalized
                 over the chosen when normalize): Switch (top_k 1, Fedus et
                 al. 2021), GShard (top_k 2, normalized), Qwen2-MoE, Jamba,
                 DeepSeekMoE.
  topk_softmax   top_k of the logits; gate = softmax over the chosen
                 logits: Mixtral (Jiang et al. 2024).
  sigmoid_bias   s = sigmoid(logits); top_k of s + b, where the bias b only
                 steers the choice and is moved outside the gradient towards
                 balance (`balance_bias_update`); gate = s (renormalized
                 over the chosen when normalize): DeepSeek-V3's
                 auxiliary-loss-free balancing (arXiv:2412.19437).

Expert choice (Zhou et al. 2022, arXiv:2202.09368): p = softmax(logits)
over experts; each expert takes the `capacity` tokens of the row with the
highest p for it, gate = p. N = E * capacity. Balanced by construction,
but a token's output depends on later tokens: not causal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

F32 = jnp.float32
TOKEN_CHOICE = ("softmax_topk", "topk_softmax", "sigmoid_bias")
ROUTERS = TOKEN_CHOICE + ("expert_choice",)


@struct.dataclass
class Routing:
  """expert, token, slot: int32 [B, N]; gate: fp32 [B, N]; probs: the
  routing distribution over experts per token, fp32 [B, L, E] (the
  softmax, or the normalized sigmoid scores), for statistics and losses."""
  expert: jax.Array
  token: jax.Array
  gate: jax.Array
  slot: jax.Array
  probs: jax.Array


def slots(expert_BxN: jax.Array, num_experts: int) -> jax.Array:
  """Rank of each assignment among the earlier ones of its row that chose
  the same expert: an exclusive running count per expert."""
  onehot = jax.nn.one_hot(expert_BxN, num_experts, dtype=jnp.int32)
  before = jnp.cumsum(onehot, axis=1) - onehot
  return jnp.take_along_axis(before, expert_BxN[..., None], -1)[..., 0]


def _normalized(gate_BxLxK, normalize: bool):
  return gate_BxLxK / jnp.sum(gate_BxLxK, -1, keepdims=True) if normalize else gate_BxLxK


def token_choice(logits_BxLxE: jax.Array, router: str, top_k: int, *,
                 normalize: bool, scale: float = 1.0,
                 bias_E: jax.Array | None = None) -> Routing:
  """Routing of a token-choice router (see the module docstring)."""
  B, L, E = logits_BxLxE.shape
  logits = logits_BxLxE.astype(F32)
  if router == "softmax_topk":
    probs = jax.nn.softmax(logits, -1)
    gate, expert = jax.lax.top_k(probs, top_k)
    gate = _normalized(gate, normalize)
  elif router == "topk_softmax":
    probs = jax.nn.softmax(logits, -1)
    top, expert = jax.lax.top_k(logits, top_k)
    gate = jax.nn.softmax(top, -1)
  elif router == "sigmoid_bias":
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, -1, keepdims=True)
    _, expert = jax.lax.top_k(scores + jax.lax.stop_gradient(bias_E), top_k)
    gate = _normalized(jnp.take_along_axis(scores, expert, -1), normalize)
  else:
    raise ValueError(f"router {router!r} is not a token-choice router; "
                     f"those are {TOKEN_CHOICE}")
  expert = expert.reshape(B, L * top_k).astype(jnp.int32)
  token = jnp.broadcast_to(jnp.repeat(jnp.arange(L, dtype=jnp.int32), top_k),
                           (B, L * top_k))
  return Routing(expert, token, (gate * scale).reshape(B, L * top_k),
                 slots(expert, E), probs)


def expert_choice(logits_BxLxE: jax.Array, capacity: int) -> Routing:
  """Each expert takes its `capacity` highest-probability tokens of the row."""
  B, L, E = logits_BxLxE.shape
  probs = jax.nn.softmax(logits_BxLxE.astype(F32), -1)
  gate, token = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)  # [B, E, C]
  expert = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32)[:, None], (E, capacity))
  slot = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (E, capacity))
  flat = lambda a: jnp.broadcast_to(a, (B, E, capacity)).reshape(B, E * capacity)
  return Routing(flat(expert), flat(token.astype(jnp.int32)), flat(gate),
                 flat(slot), probs)


@struct.dataclass
class RouterStats:
  """Per layer, fp32 scalars except load ([E]).

  load: fraction of the assignments that chose each expert (before any
    capacity drop; sums to 1, 1/E when balanced).
  balance_loss: Switch's load-balancing loss E * sum_i load_i * mean_p_i
    (1 when balanced; Fedus et al. 2021, eq. 4).
  z_loss: ST-MoE's router z-loss mean(logsumexp(logits)^2) (Zoph et al.
    2022, arXiv:2202.08906, eq. 5).
  entropy: mean entropy of the routing distribution per token (nats).
  dropped: fraction of the assignments dropped over capacity; for expert
    choice, the fraction of tokens that no expert took.
  """
  load: jax.Array
  balance_loss: jax.Array
  z_loss: jax.Array
  entropy: jax.Array
  dropped: jax.Array


def router_stats(logits_BxLxE: jax.Array, r: Routing, dropped: jax.Array
                 ) -> RouterStats:
  E = logits_BxLxE.shape[-1]
  load = jnp.mean(jax.nn.one_hot(r.expert, E, dtype=F32), axis=(0, 1))
  mean_p = jnp.mean(r.probs, axis=(0, 1))
  z = jax.nn.logsumexp(logits_BxLxE.astype(F32), -1)
  p = r.probs
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
  return RouterStats(load=load, balance_loss=E * jnp.sum(load * mean_p),
                     z_loss=jnp.mean(z * z), entropy=jnp.mean(entropy),
                     dropped=jnp.asarray(dropped, F32))


def balance_bias_update(bias_E: jax.Array, load_E: jax.Array, rate: float
                        ) -> jax.Array:
  """DeepSeek-V3's bias step: b_i <- b_i + rate * sign(mean load - load_i):
  overloaded experts become less attractive, underloaded ones more."""
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)
