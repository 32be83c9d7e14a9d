"""Pure train and eval steps, jitted once per `Setup`.

    train_step = make_train_step(setup)       # (state, batch) -> (state, metrics)
    eval_step = make_eval_step(setup)         # (state, batch) -> token sums

A batch is a dict of [B, L] arrays: inputs, targets (int32), loss_mask, and
optionally segment_ids. The loss is the mean fp32 cross-entropy over
loss_mask positions of the whole batch. With grad_accum = A the batch is
cut into A micro-batches (rows i*A + a form micro-batch a, so each one stays
spread over the mesh); summed token losses and their gradients are
accumulated in fp32 and divided by the batch's total mask count once, so
the update equals the one-big-batch update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from arches.validation import ConfigError
from train.optim import learning_rate
from train.sharding import batch_divisor, batch_sharding
from train.state import Setup, TrainState


def masked_nll(logits_BxLxV, batch):
  """(sum of fp32 token nll over loss_mask positions, mask count)."""
  mask = batch["loss_mask"].astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), batch["targets"])
  return (nll * mask).sum(), mask.sum()


def token_sums(logits_BxLxV, batch) -> dict:
  """Sums over loss_mask positions: nll, mask count, correct argmax."""
  nll, count = masked_nll(logits_BxLxV, batch)
  correct = jnp.argmax(logits_BxLxV, -1) == batch["targets"]
  return {"nll": nll, "count": count,
          "correct": (correct * batch["loss_mask"].astype(jnp.float32)).sum()}


def forward(graphdef, params, buffers, batch):
  model = nnx.merge(graphdef, params, buffers)
  return model(batch["inputs"], segment_ids=batch.get("segment_ids"))


def _nll_sum(params, buffers, graphdef, batch):
  return masked_nll(forward(graphdef, params, buffers, batch), batch)


def summed_grads(graphdef, params, buffers, batch, grad_accum: int):
  """(sum of token nll, mask count, d sum / d params), over `grad_accum`
  sequential micro-batches."""
  grad_fn = jax.value_and_grad(_nll_sum, has_aux=True)
  if grad_accum == 1:
    (nll, count), grads = grad_fn(params, buffers, graphdef, batch)
    return nll, count, grads

  def micro(x):  # [B, ...] -> [A, B/A, ...]; row i*A + a -> micro-batch a
    return jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum,
                                  *x.shape[1:]), 0, 1)

  def body(carry, mb):
    (nll, count), grads = grad_fn(params, buffers, graphdef, mb)
    return jax.tree.map(jnp.add, carry, (nll, count, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
           jax.tree.map(jnp.zeros_like, params))
  out, _ = jax.lax.scan(body, zeros, jax.tree.map(micro, batch))
  return out


def _train_step(setup: Setup, state: TrainState, batch: dict):
  grad_accum = setup.cfg.train.grad_accum
  nll, count, grads = summed_grads(setup.graphdef, state.params, state.buffers,
                                   batch, grad_accum)
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  lr = learning_rate(setup.cfg.optimizer, setup.cfg.train.steps)(state.step)
  metrics = {"loss": nll / denom, "grad_norm": optax.tree.norm(grads), "lr": lr}
  new = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
  return new, metrics


def make_train_step(setup: Setup):
  """The jitted step; the input state is donated (its buffers are reused)."""
  def step(state, batch):
    return _train_step(setup, state, batch)
  return jax.jit(step, donate_argnums=0,
                 in_shardings=(setup.state_sharding, batch_sharding(setup.mesh)),
                 out_shardings=(setup.state_sharding, None))


def make_eval_step(setup: Setup):
  """Jitted (state, batch) -> token sums of the batch (see `token_sums`)."""
  def step(state, batch):
    return token_sums(forward(setup.graphdef, state.params, state.buffers, batch),
                      batch)
  return jax.jit(step, in_shardings=(setup.state_sharding, batch_sharding(setup.mesh)))


def check_batch_shape(setup: Setup, batch_size: int):
  """A clear error for a micro-batch the mesh can't split (that grad_accum
  divides batch_size is checked when the config is built)."""
  A, n = setup.cfg.train.grad_accum, batch_divisor(setup.mesh)
  if (batch_size // A) % n:
    raise ConfigError(f"micro-batch size train.batch_size/train.grad_accum = "
                      f"{batch_size // A} must be divisible by the {n} devices of the "
                      "data x fsdp mesh", "train.batch_size", "train.grad_accum")
