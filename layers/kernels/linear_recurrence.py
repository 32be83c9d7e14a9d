"""Diagonal linear recurrences h_t = a_t * h_{t-1} + b_t: the one
linear-scan op (RG-LRU, S5, the S4D/DSS recurrent forms, and the combine of
Mamba's selective scan).

`LINEAR_RECURRENCE` implementations take a, b [B, L, C] and h0 [B, C] and
return every h_t [B, L, C] and the last state [B, C]; real inputs are
scanned in fp32 (a product of many decays in bf16 drifts within a few
hundred steps), complex ones in complex64:

  * "associative": `lax.associative_scan` over (a, b) pairs, O(log L)
    depth, O(L) work; the pure-JAX form for GPUs/TPUs.
  * "sequential": `lax.scan`, one step at a time; the CPU form, and the
    reference the others are checked against.
  * "pallas_tpu", "pallas_gpu": `layers.kernels.pallas.scan_tpu` /
    `scan_gpu`, the state on chip over time blocks; real inputs only.

`linear_scan` is the entry point: any trailing shape, `a` broadcast to `b`,
the implementation chosen for the call's platform and dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.kernels import Impl, Op
from layers.kernels.pallas import scan_gpu, scan_tpu


def combine(left, right):
  """Compose h -> a1 h + b1 then h -> a2 h + b2 (the associative operator)."""
  a_l, b_l = left
  a_r, b_r = right
  return a_l * a_r, a_r * b_l + b_r


def scan_dtype(*arrays):
  """complex64 if any input is complex, else float32."""
  if any(jnp.iscomplexobj(x) for x in arrays):
    return jnp.complex64
  return jnp.float32


@jax.jit
def associative(a_BxLxC, b_BxLxC, h0_BxC):
  dtype = scan_dtype(a_BxLxC, b_BxLxC, h0_BxC)
  a, b = a_BxLxC.astype(dtype), b_BxLxC.astype(dtype)
  # Fold the initial state into the first input: h_0 = a_0 h0 + b_0.
  b = b.at[:, 0].add(a[:, 0] * h0_BxC.astype(dtype))
  _, h = jax.lax.associative_scan(combine, (a, b), axis=1)
  return h, h[:, -1]


@jax.jit
def sequential(a_BxLxC, b_BxLxC, h0_BxC):
  dtype = scan_dtype(a_BxLxC, b_BxLxC, h0_BxC)

  def step(h, ab):
    a_t, b_t = ab
    h = a_t * h + b_t
    return h, h

  ab = (jnp.swapaxes(a_BxLxC, 0, 1).astype(dtype),
        jnp.swapaxes(b_BxLxC, 0, 1).astype(dtype))
  last, h = jax.lax.scan(step, h0_BxC.astype(dtype), ab)
  return jnp.swapaxes(h, 0, 1), last


# Forward FLOPs per channel per token: a sequential step is one multiply-add
# (the GPU kernel's too); the associative scan's up and down sweeps do about
# twice its combines, each three operations; the TPU kernel's Hillis-Steele
# scan over 128-step blocks does log2(128) = 7 combines, then h = A h_in + B.
RECURRENCE_FLOPS = {"associative": 6, "sequential": 2, "pallas_tpu": 23,
                    "pallas_gpu": 2}

LINEAR_RECURRENCE = Op(
    "linear_recurrence",
    impls={"associative": Impl("associative", associative),
           "sequential": Impl("sequential", sequential),
           "pallas_tpu": scan_tpu.IMPL,
           "pallas_gpu": scan_gpu.IMPL},
    # On CPU a plain scan beats the associative scan's extra work and depth
    # bookkeeping; wide devices want the kernels (state on chip), then the
    # O(log L)-depth form.
    order={"cpu": ("sequential", "associative"),
           "tpu": ("pallas_tpu", "associative", "sequential"),
           "gpu": ("pallas_gpu", "associative", "sequential"),
           "default": ("associative", "sequential")},
)


def linear_scan(a, b, h0, kernel: str = "auto"):
  """Every h_t = a_t h_{t-1} + b_t along axis 1, and the last state.

  b [B, L, *S]; a broadcastable to b; h0 [B, *S]. Real inputs scan in
  fp32, complex in complex64. Returns (h [B, L, *S], last [B, *S])."""
  dtype = scan_dtype(a, b, h0)
  B, L = b.shape[:2]
  flat = lambda x: jnp.broadcast_to(x, b.shape).astype(dtype).reshape(B, L, -1)
  impl = LINEAR_RECURRENCE.choose(kernel, dtype=dtype)
  h, last = impl.fn(flat(a), flat(b), h0.astype(dtype).reshape(B, -1))
  return h.reshape(b.shape), last.reshape(h0.shape)
