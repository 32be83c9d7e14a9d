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

Models with auxiliary outputs (mixture-of-experts layers, `DecoderLM.with_aux`)
add their weighted auxiliary losses to the objective: each micro-batch
contributes count * aux_loss to the summed loss, so after the division the
update follows mean nll + (token-weighted mean) aux loss. Their statistics
are logged per layer (`train.trainer.metrics.aux_metrics`), and their balancing steps
outside the gradient (DeepSeek-V3's router bias) update the non-parameter
state `TrainState.buffers` after each step, from the loads of the whole
batch. The forward runs under the run's `layers.parallel` layout, so MoE
layers with capacity dispatch send tokens to their experts' devices on an
expert axis, the residual stream keeps its batch and length split at every
block, and mixers split along the length run their sequence-parallel form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from arches.validation import ConfigError
from layers import parallel
from train.trainer.metrics import aux_metrics
from train.trainer.optim import learning_rate
from train.trainer.sharding import batch_divisor, batch_sharding
from train.trainer.state import Setup, TrainState


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


def forward_with_aux(graphdef, params, buffers, batch, layout=None):
  """(logits, aux) of the model on the batch; see the module docstring."""
  model = nnx.merge(graphdef, params, buffers)
  with parallel.use(layout):
    return model.with_aux(batch["inputs"], segment_ids=batch.get("segment_ids"))


def forward(graphdef, params, buffers, batch, layout=None):
  return forward_with_aux(graphdef, params, buffers, batch, layout)[0]


def _objective(params, buffers, graphdef, batch, layout):
  logits, aux = forward_with_aux(graphdef, params, buffers, batch, layout)
  nll, count = masked_nll(logits, batch)
  aux_loss = sum((a.loss for a in aux.values()), jnp.zeros((), jnp.float32))
  return nll + count * aux_loss, (nll, count, count * aux_loss, aux)


def accumulate(graphdef, params, buffers, batch, grad_accum: int, layout=None):
  """Sums over `grad_accum` sequential micro-batches: (token nll, mask
  count, count-weighted aux loss, d(nll + count * aux loss)/d params, and
  each layer's aux averaged over the micro-batches)."""
  grad_fn = jax.value_and_grad(_objective, has_aux=True)
  if grad_accum == 1:
    (_, (nll, count, aux_loss, aux)), grads = grad_fn(params, buffers, graphdef,
                                                      batch, layout)
    return nll, count, aux_loss, grads, aux

  def micro(x):  # [B, ...] -> [A, B/A, ...]; row i*A + a -> micro-batch a
    return jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum,
                                  *x.shape[1:]), 0, 1)

  def sums(mb):
    (_, (nll, count, aux_loss, aux)), grads = grad_fn(params, buffers, graphdef,
                                                      mb, layout)
    return nll, count, aux_loss, grads, aux

  def body(carry, mb):
    return jax.tree.map(jnp.add, carry, sums(mb)), None

  first = jax.tree.map(lambda x: x[0], jax.tree.map(micro, batch))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(sums, first))
  out, _ = jax.lax.scan(body, zeros, jax.tree.map(micro, batch))
  *out, aux = out
  return (*out, jax.tree.map(lambda a: a / grad_accum, aux))


def summed_grads(graphdef, params, buffers, batch, grad_accum: int):
  """(sum of token nll, mask count, d(nll + count * aux loss)/d params) over
  `grad_accum` sequential micro-batches (`accumulate` without its aux)."""
  nll, count, _, grads, _ = accumulate(graphdef, params, buffers, batch, grad_accum)
  return nll, count, grads


def _balanced(graphdef, params, buffers, aux):
  """The buffers after each layer's balancing step from this batch's aux."""
  if not aux:
    return buffers
  model = nnx.merge(graphdef, params, buffers)
  model.update_balance(aux)
  return nnx.split(model, nnx.Param, ...)[2]


def _train_step(setup: Setup, state: TrainState, batch: dict):
  grad_accum = setup.cfg.train.grad_accum
  nll, count, aux_loss, grads, aux = accumulate(
      setup.graphdef, state.params, state.buffers, batch, grad_accum, setup.layout)
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  lr = learning_rate(setup.cfg.optimizer, setup.cfg.train.steps)(state.step)
  metrics = {"loss": nll / denom, "grad_norm": optax.tree.norm(grads), "lr": lr,
             **aux_metrics(aux, aux_loss / denom)}
  buffers = _balanced(setup.graphdef, state.params, state.buffers, aux)
  new = state.replace(params=params, opt_state=opt_state, buffers=buffers,
                      step=state.step + 1)
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
    return token_sums(forward(setup.graphdef, state.params, state.buffers, batch,
                              setup.layout), batch)
  return jax.jit(step, in_shardings=(setup.state_sharding, batch_sharding(setup.mesh)))


def check_batch_shape(setup: Setup, batch_size: int):
  """A clear error for a micro-batch the mesh can't split (that grad_accum
  divides batch_size is checked when the config is built)."""
  A, n = setup.cfg.train.grad_accum, batch_divisor(setup.mesh)
  if (batch_size // A) % n:
    raise ConfigError(f"micro-batch size train.batch_size/train.grad_accum = "
                      f"{batch_size // A} must be divisible by the {n} devices of the "
                      "data x fsdp x expert axes", "train.batch_size", "train.grad_accum")
