"""The functional trainer: optimizer pieces, one compile per step function,
grad accumulation == big batch, remat and bf16, the run loop's outputs,
non-finite stop, metrics helpers, length-extrapolation eval."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from trainer_fixtures import (ToyIter, compile_cache, count_compiles,  # noqa: F401
                              eval_batches, tiny_config)
from arches.validation import ConfigError
from train import configs
from train.trainer import eval as evaluation
from train.trainer import metrics, optim
from train.trainer.checkpoint import Checkpointer
from train.config import DataConfig, OptimizerConfig
from train.loop import NonFiniteLossError, evaluate, run, train
from train.trainer.rundir import check_writable, record_differences
from train.trainer.sharding import shard_batch
from train.trainer.state import build
from train.trainer.step import make_eval_step, make_train_step, summed_grads

TOY = {"corpus_fingerprint": "toy"}
pytestmark = pytest.mark.usefixtures("compile_cache")


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# -- optimizer ---------------------------------------------------------------

def test_schedules_warm_up_then_decay_to_min_ratio():
  base = OptimizerConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
  for name, mid in (("cosine", 0.55), ("linear", 0.55), ("constant", 1.0)):
    lr = optim.learning_rate(dataclasses.replace(base, schedule=name), 14)
    vals = [float(lr(s)) for s in range(15)]
    np.testing.assert_allclose(vals[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(vals[9], mid, rtol=1e-5)   # halfway through decay
    np.testing.assert_allclose(vals[14], 1.0 if name == "constant" else 0.1, rtol=1e-5)
  with pytest.raises(ConfigError, match="optimizer.schedule='step' must be one of cosine"):
    dataclasses.replace(base, schedule="step")


class _Small(nnx.Module):
  """Every kind of parameter the mask tells apart, at toy size."""

  def __init__(self):
    from layers.norms import LayerNorm
    from layers.params import Dense, Embed
    rngs = nnx.Rngs(0)
    self.embed = Embed(16, 8, rngs=rngs)
    self.up = Dense(8, (2, 4), in_axes=("embed",), out_axes=("heads", "head_dim"),
                    rngs=rngs, use_bias=True)
    self.out_norm = LayerNorm(8, rngs=rngs)
    self.head = Dense(8, 16, in_axes=("embed",), out_axes=("vocab",), rngs=rngs)


def _decayed(params, decay_embeddings):
  mask = optim.decay_mask(params, decay_embeddings)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return {"/".join(str(k.key) for k in p[:-1]): bool(v) for p, v in flat}


def test_weight_decay_mask_skips_norms_biases_and_embeddings():
  params = nnx.state(_Small(), nnx.Param)
  d = _decayed(params, False)
  assert d == {"embed/embedding": False, "up/kernel": True, "up/bias": False,
               "out_norm/scale": False, "out_norm/bias": False, "head/kernel": True}
  assert _decayed(params, True)["embed/embedding"] is True
  # The real model: block norms are spared, matrices decayed.
  d = _decayed(build(tiny_config("unused")).abstract_state.params, False)
  assert not d["blocks/0/mixer_norm/scale"] and d["blocks/0/mixer/proj/q/kernel"]


@pytest.mark.parametrize("mixer,spared,decayed", [
    # SSM dynamics and RWKV's time parameters, as in the reference
    # optimizers; the matrices beside them are still decayed.
    ("mamba", "A_log", "in_proj/kernel"),
    ("s4", "core/lambda_im", "core/C"),
    ("s4", "core/B", "out/proj/kernel"),
    ("rwkv6", "decay_b", "receptance/kernel"),
])
def test_weight_decay_spares_parameters_marked_by_their_mixer(mixer, spared, decayed):
  cfg = tiny_config("unused")
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, mixer=mixer if mixer != "rwkv6" else {"name": "rwkv6", "head_dim": 16}))
  d = _decayed(build(cfg).abstract_state.params, False)
  assert d[f"blocks/0/mixer/{spared}"] is False
  assert d[f"blocks/0/mixer/{decayed}"] is True


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_optimizer_decays_only_masked_params_and_descends(name):
  params = nnx.state(_Small(), nnx.Param)
  cfg = OptimizerConfig(name=name, lr=0.1, weight_decay=0.5, warmup_steps=0,
                        schedule="constant")
  tx = optim.make_optimizer(cfg, 10, params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
  mask = jax.tree.leaves(optim.decay_mask(params, False))
  for m, u, p in zip(mask, jax.tree.leaves(updates), jax.tree.leaves(params)):
    # With zero gradients only decoupled decay moves a parameter: -lr*wd*p.
    np.testing.assert_allclose(u, -0.05 * p if m else 0 * p, rtol=1e-6, atol=1e-8)
  # And it descends a quadratic.
  loss = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))
  cfg = dataclasses.replace(cfg, lr=0.01, weight_decay=0.0)
  tx = optim.make_optimizer(cfg, 10, params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  state, start = tx.init(params), loss(params)
  for _ in range(5):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert loss(params) < 0.9 * start
  with pytest.raises(ConfigError, match="optimizer.name='sgd' must be one of adamw, lion"):
    OptimizerConfig(name="sgd")


# -- the step ----------------------------------------------------------------

def test_train_step_compiles_once(tmp_path):
  """Counted, not timed: the jit cache holds one entry and no backend
  compile happens after the first step."""
  setup = build(tiny_config(str(tmp_path)))
  step = make_train_step(setup)
  state, it = setup.init_state(), ToyIter()
  state, _ = step(state, shard_batch(next(it), setup.mesh))
  with count_compiles() as compiles:
    for _ in range(3):
      state, m = step(state, shard_batch(next(it), setup.mesh))
    float(m["loss"])
  assert step._cache_size() == 1
  assert not compiles, compiles
  assert int(state.step) == 4


def _grads(cfg, params, batch):
  """(mean loss, mean-loss gradient) as the train step computes them."""
  setup = build(cfg)
  fn = jax.jit(lambda p, b: summed_grads(setup.graphdef, p, nnx.State({}), b,
                                          cfg.train.grad_accum))
  nll, count, grads = fn(params, batch)
  return float(nll / count), leaves(jax.tree.map(lambda g: g / count, grads))


def test_grad_accumulation_with_remat_equals_the_plain_big_batch_step():
  """One variant with both (one compile fewer): each is exact on its own,
  so together they must match the plain step too."""
  cfg = tiny_config("unused")
  params = build(cfg).init_state().params
  batch = ToyIter(segments=True).batch(0)
  batch["loss_mask"][:1] = 0.0  # uneven token counts across micro-batches
  ref_loss, ref = _grads(cfg, params, batch)
  variant = dataclasses.replace(
      cfg, train=dataclasses.replace(cfg.train, grad_accum=2),
      model=dataclasses.replace(cfg.model, remat=True))
  loss, grads = _grads(variant, params, batch)
  assert abs(loss - ref_loss) < 1e-6
  remat = build(variant)
  jaxpr = jax.make_jaxpr(lambda p: summed_grads(remat.graphdef, p, nnx.State({}),
                                                 batch, 2))(params)
  assert "remat" in str(jaxpr)  # the blocks really are rematerialized
  for a, b in zip(grads, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_fp32_master_weights_and_loss():
  cfg = tiny_config("unused")
  setup = build(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16")))
  batch = ToyIter().batch(0)
  ref_loss, _ = _grads(cfg, setup.init_state().params, batch)
  new, m = make_train_step(setup)(setup.init_state(), shard_batch(batch, setup.mesh))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
  assert m["loss"].dtype == jnp.float32
  assert abs(float(m["loss"]) - ref_loss) < 0.02 * ref_loss


# -- the run -----------------------------------------------------------------

def test_run_writes_logs_checkpoints_and_summary(tmp_path):
  run_dir = str(tmp_path / "run")
  cfg = tiny_config(run_dir, eval_every=4, checkpoint_every=4)
  s = train(cfg, ToyIter(), eval_batches(), data_info=TOY)
  for key in ("params", "tokens_per_s", "step_time_s", "compile_time_s", "mfu",
              "peak_memory_bytes", "val_loss", "val_ppl", "val_accuracy",
              "train_loss", "run_dir"):
    assert key in s, key
  assert s["mfu"] is None and s["device_kind"] == "cpu"   # no invented CPU peak
  assert s["compile_time_s"] > 0 and s["tokens_per_s"] > 0
  assert math.isclose(s["val_ppl"], math.exp(s["val_loss"]))
  records = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
  train_losses = [r["loss"] for r in records if "loss" in r]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
  assert train_losses[-1] < train_losses[0]
  assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
  assert os.listdir(os.path.join(run_dir, "tb"))
  assert configs.load(os.path.join(run_dir, configs.FILENAME)) == cfg  # the run record
  assert json.load(open(os.path.join(run_dir, "data.json"))) == TOY
  assert Checkpointer(os.path.join(run_dir, "checkpoints"), keep=2).latest_step() == 8
  # Rerunning a finished run trains nothing and reports the same final state;
  # a change allowed on resume is logged at the step it applies from and
  # recorded.
  more_evals = configs.replace(cfg, train={"eval_every": 2})
  again = train(more_evals, ToyIter(), eval_batches(), data_info=TOY)
  assert again["train_loss"] == s["train_loss"] and again["val_loss"] == s["val_loss"]
  records = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
  assert [r for r in records if "event" in r] == [{
      "step": 8, "event": "resume",
      "changed": {"train.eval_every": {"saved": 4, "now": 2}}}]
  assert configs.load(os.path.join(run_dir, configs.FILENAME)) == more_evals


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  run_dir = str(tmp_path / "run")
  cfg = tiny_config(run_dir, checkpoint_every=2)
  with pytest.raises(NonFiniteLossError, match="non-finite loss nan .* at step 5"):
    train(cfg, ToyIter(nan_mask_at=4), eval_batches(), data_info=TOY)
  ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=2)
  assert ckpt.latest_step() == 4
  setup = build(cfg)
  state, data_state = ckpt.restore(4, setup.abstract_state)
  assert data_state == {"pos": 4} and int(state.step) == 4
  assert all(np.isfinite(x).all() for x in leaves(state.params))
  # Resuming those checkpoints with another model, other data, another seed
  # or other data files is refused by name, and the run record is kept.
  record = open(os.path.join(run_dir, configs.FILENAME)).read()
  for other, match in [
      (configs.replace(cfg, model={"d_model": 48}), r"model.d_model \(saved 32, now 48\)"),
      (configs.replace(cfg, data={"seq_len": 64}), r"data.seq_len \(saved 32, now 64\)"),
      (configs.replace(cfg, train={"seed": 1}), r"train.seed \(saved 0, now 1\)"),
      (cfg, "other data under the same config: data.json.corpus_fingerprint")]:
    with pytest.raises(ConfigError, match="holds checkpoints .*" + match):
      train(other, ToyIter(), eval_batches(),
            data_info=TOY if other is not cfg else {"corpus_fingerprint": "edited"})
  assert open(os.path.join(run_dir, configs.FILENAME)).read() == record


# -- metrics and eval ----------------------------------------------------------

def test_peak_flops_table_and_mfu():
  assert metrics.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
  assert metrics.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert metrics.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert metrics.peak_flops("cpu", "bfloat16") is None
  assert metrics.mfu(1e9, 1e3, jax.devices(), "float32") is None
  assert metrics.peak_memory_bytes() is None or metrics.peak_memory_bytes() > 0


def test_step_timer_skips_warmup_and_excluded_intervals(monkeypatch):
  clock = iter([0.0, 10.0, 11.0, 12.0, 20.0, 21.0])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  t = metrics.StepTimer(skip=2)
  for i in range(6):
    if i == 4:
      t.exclude_current()  # the 12 -> 20 interval held an eval
    t.step_done()
  assert t.step_time == 1.0


def test_evaluate_lengths_runs_each_multiple(tmp_path):
  setup = build(tiny_config(str(tmp_path)))
  state = setup.init_state()

  def make_batches(data_cfg, batch_size, n):
    it = ToyIter(batch_size, data_cfg.seq_len, seed=7)
    return [next(it) for _ in range(n)]

  out = evaluation.evaluate_lengths(setup, state, (1, 2), eval_step=make_eval_step(setup),
                                    make_batches=make_batches, n_batches=1)
  assert set(out) == {1, 2}
  for m in out.values():
    assert abs(m["val_loss"] - math.log(64)) < 0.5 and 0 <= m["val_accuracy"] <= 1
  with pytest.raises(ValueError, match="multiples >= 1"):
    evaluation.evaluate_lengths(setup, state, (0,), eval_step=make_eval_step(setup),
                                make_batches=make_batches)


def test_bits_per_byte_for_text_accuracy_for_tasks():
  sums = {"nll": 2.0 * math.log(2) * 10, "count": 10.0, "correct": 4.0}
  text = evaluation.summarize(sums, DataConfig(task="text"))
  assert math.isclose(text["val_bpb"], 2.0) and "val_accuracy" not in text
  task = evaluation.summarize(sums, tiny_config("x").data)
  assert task["val_accuracy"] == 0.4 and "val_bpb" not in task


def test_run_on_the_data_pipeline_then_evaluate_the_checkpoint(tmp_path):
  """run(cfg) end to end on the real selective-copy stream, with the
  length-extrapolation eval; evaluate(cfg) reproduces its final metrics."""
  cfg = tiny_config(str(tmp_path / "run"), steps=8, eval_lengths=(1, 2))
  s = run(cfg)
  assert set(s["eval_lengths"]) == {1, 2}
  assert math.isclose(s["eval_lengths"][1]["val_loss"], s["val_loss"], rel_tol=1e-6)
  assert json.load(open(tmp_path / "run" / "data.json"))["task"] == "selective_copy"
  # `mixerlab eval --config run_dir/config.yaml`: the run record rebuilds the run.
  record = configs.load(str(tmp_path / "run" / configs.FILENAME))
  assert record == cfg
  e = evaluate(record)
  assert e["step"] == 8
  for k in ("val_loss", "val_accuracy"):
    assert math.isclose(e[k], s[k], rel_tol=1e-6), k
  assert math.isclose(e["eval_lengths"][2]["val_loss"], s["eval_lengths"][2]["val_loss"],
                      rel_tol=1e-6)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    evaluate(tiny_config(str(tmp_path / "empty")))
  with pytest.raises(ConfigError, match=r"another model: model.n_layers \(saved 2, now 1\)"):
    evaluate(configs.replace(cfg, model={"n_layers": 1}))



def test_unusable_run_dir_is_refused_naming_the_path(tmp_path):
  file = tmp_path / "file"
  file.write_text("")
  with pytest.raises(ConfigError, match="train.run_dir='.*file' is a file, not a directory"):
    check_writable(str(file))
  with pytest.raises(ConfigError, match=r"cannot be written: Not a directory \(.*file/run\)"):
    check_writable(str(file / "run"))
  if os.geteuid() != 0:  # root writes anyway
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"cannot be written: Permission denied"):
      check_writable(str(locked))


def test_a_key_the_run_record_predates_counts_as_its_default(tmp_path):
  cfg = tiny_config(str(tmp_path))
  path = configs.save(cfg, str(tmp_path))
  old = [l for l in open(path) if not l.strip().startswith("remat:")]
  open(path, "w").writelines(old)  # as written before model.remat existed
  assert record_differences(cfg) == {}
  assert record_differences(configs.replace(cfg, model={"d_model": 48})) == {
      "model.d_model": {"saved": 32, "now": 48}}
