"""Mixture of experts: every router against the paper's math written naively
(float64 numpy, no shared code path), every dispatch against the dense
reference, the channel-mixer checks (shape, dtype, jit, gradients,
determinism, bf16), decoding, bad options, the DeepSeek-V3 bias step, and
the trainer (aux losses, logged statistics, exact resume of the bias)."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arches.lm import DecoderLM, LMConfig
from layers import channel
from layers.channel import dispatch, experts, routers
from layers.channel.moe import MoE
from trainer_fixtures import ToyIter, compile_cache, eval_batches, tiny_config  # noqa: F401

D, E, B, L = 16, 4, 2, 8


def inputs(seed=0, shape=(B, L, D), dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def build(**options) -> MoE:
  options = {"num_experts": E, "hidden": 12, **options}
  return channel.build("moe", D, rngs=nnx.Rngs(0), **options)


@functools.partial(jax.jit, static_argnums=0)
def _with_aux(graphdef, state, x):
  return nnx.merge(graphdef, state).with_aux(x)


def run(m: MoE, x):
  """m.with_aux(x), jitted: one compile per layer configuration and shape
  instead of one per operation (eager XLA:CPU compiles dominate otherwise)."""
  return _with_aux(*nnx.split(m), x)


# -- the papers' math, naively -------------------------------------------------

def _softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _expert(m: MoE, e: int, x):
  """Expert e's MLP: SwiGLU, or GELU (tanh form, jax.nn.gelu's default)."""
  w = lambda v: np.asarray(v[...], np.float64)[e]
  h = x @ w(m.experts.up)
  if m.experts.gate is not None:
    g = x @ w(m.experts.gate)
    h = g / (1 + np.exp(-g)) * h
  else:
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  return h @ w(m.experts.down)


def choices(m: MoE, router: str, x_D):
  """{expert: gate} for one token, from the router's paper."""
  z = x_D @ np.asarray(m.router_proj.kernel[...], np.float64)
  k = m.top_k
  if router == "softmax_topk":  # Switch eq. 1-2 / GShard: top-k of softmax
    p = _softmax(z)
    top = np.argsort(-p)[:k]
    g = p[top] / (p[top].sum() if m.normalize_gates else 1.0)
  elif router == "topk_softmax":  # Mixtral: softmax over the top-k logits
    top = np.argsort(-z)[:k]
    g = _softmax(z[top])
  elif router == "sigmoid_bias":  # DeepSeek-V3 eq. 15-17
    s = 1 / (1 + np.exp(-z))
    top = np.argsort(-(s + np.asarray(m.bias[...], np.float64)))[:k]
    g = s[top] / s[top].sum()
  return dict(zip(top.tolist(), (g * m.route_scale).tolist()))


def layer_ref(m: MoE, router: str, x_BxLxD, dropped=()):
  """The layer's output from `choices`, minus the (b, l, e) in `dropped`."""
  x = np.asarray(x_BxLxD, np.float64)
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    for l in range(x.shape[1]):
      for e, g in choices(m, router, x[b, l]).items():
        if (b, l, e) not in dropped:
          y[b, l] += g * _expert(m, e, x[b, l])
  return y


def expert_choice_ref(m: MoE, x_BxLxD, capacity):
  """Zhou et al. 2022, eq. 1-3: S = softmax(X W); each expert takes its
  top-`capacity` tokens by S[:, e]; Y = sum over the (token, expert) pairs."""
  x = np.asarray(x_BxLxD, np.float64)
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    S = _softmax(x[b] @ np.asarray(m.router_proj.kernel[...], np.float64))
    for e in range(S.shape[1]):
      for t in np.argsort(-S[:, e], kind="stable")[:capacity]:
        y[b, t] += S[t, e] * _expert(m, e, x[b, t])
  return y


TOKEN_ROUTERS = [("softmax_topk", {}), ("softmax_topk", {"top_k": 1}),
                 ("softmax_topk", {"normalize_gates": True}), ("topk_softmax", {}),
                 ("sigmoid_bias", {"route_scale": 2.5})]


@pytest.mark.parametrize("router,opts", TOKEN_ROUTERS)
def test_token_choice_routers_match_their_papers(router, opts):
  m = build(router=router, dispatch="dense", **opts)
  if router == "sigmoid_bias":  # a bias that changes choices, as after training
    m.bias[...] = jnp.array([0.3, -0.2, 0.0, 0.1])
  x = inputs()
  np.testing.assert_allclose(np.asarray(run(m, x)[0]), layer_ref(m, router, x), atol=1e-5)


def test_planted_router_bug_is_caught(monkeypatch):
  """softmax after top-k where the config says before: the reference test fails."""
  m = build(router="softmax_topk", dispatch="dense")
  x = inputs(shape=(B, L - 1, D))  # a shape no other test compiled: traced anew
  orig = routers.token_choice
  monkeypatch.setattr(routers, "token_choice",
                      lambda logits, router, *a, **k: orig(logits, "topk_softmax", *a, **k))
  assert np.abs(np.asarray(run(m, x)[0]) - layer_ref(m, "softmax_topk", x)).max() > 1e-3


def test_expert_choice_matches_paper_and_is_declared_non_causal():
  m = build(router="expert_choice", dispatch="capacity", capacity_factor=0.75)
  assert not m.info.causal
  assert MoE.info_for(router="expert_choice", dispatch="capacity").causal is False
  assert m.info_for(router="topk_softmax").causal
  C = dispatch.capacity_of(L, 2, E, 0.75)
  x = inputs(1)
  y, aux = run(m, x)
  np.testing.assert_allclose(np.asarray(y), expert_choice_ref(m, x, C), atol=1e-5)
  dense = build(router="expert_choice", dispatch="dense", capacity_factor=0.75)
  np.testing.assert_allclose(np.asarray(run(dense, x)[0]), np.asarray(y), atol=1e-6)
  taken = np.zeros((B, L), bool)
  S = _softmax(np.asarray(x, np.float64) @ np.asarray(m.router_proj.kernel[...], np.float64))
  for b in range(B):
    for e in range(E):
      taken[b, np.argsort(-S[b, :, e], kind="stable")[:C]] = True
  assert abs(float(aux.stats.dropped) - (1 - taken.mean())) < 1e-6
  with pytest.raises(ValueError, match="not causal"):
    LMConfig(channel={"name": "moe", "router": "expert_choice", "dispatch": "capacity"})
  with pytest.raises(ValueError, match="no incremental"):
    m.init_cache(B, L)


# -- dispatch --------------------------------------------------------------------

@pytest.mark.parametrize("router,opts", TOKEN_ROUTERS[:1] + TOKEN_ROUTERS[3:])
def test_dropless_and_roomy_capacity_equal_the_dense_reference(router, opts):
  ref = build(router=router, dispatch="dense", **opts)
  x = inputs(2, (3, 13, D))  # rows not a multiple of any tile
  want = np.asarray(run(ref, x)[0])
  for name, extra in (("dropless", {}), ("dropless", {"tile": 2}),
                      ("capacity", {"capacity_factor": E / 2})):
    m = build(router=router, dispatch=name, **opts, **extra)
    y, aux = run(m, x)
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5, err_msg=f"{name} {extra}")
    assert float(aux.stats.dropped) == 0.0


def test_grouped_matmul_forms_agree_with_gradients():
  """ragged_dot (the GPU/TPU form, densely emulated here) and the tiles,
  whose backward pass is written by hand: values and gradients."""
  w = build().experts.weights(jnp.float32)
  counts = jnp.array([5, 0, 9, 2])
  x = inputs(3, (16, D))

  def value_and_grads(impl, tile):
    f = lambda w, x: experts.GROUPED.impls[impl].fn(w, x, counts, tile)
    y, vjp = jax.vjp(f, w, x)
    return y, vjp(jnp.cos(y))  # the gradient of sum(sin(y))

  want = value_and_grads("ragged_dot", 4)
  for tile in (1, 4, 128):
    got = value_and_grads("tiled", tile)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  with pytest.raises(ValueError, match="dense emulation"):
    experts.GROUPED.choose("ragged_dot", platform="cpu")
  assert experts.GROUPED.choose("auto", platform="gpu").name == "ragged_dot"
  assert experts.GROUPED.choose("auto", platform="cpu").name == "tiled"


def over_capacity(m: MoE, x, capacity):
  """(b, l, e) assignments past `capacity` per expert and row, counting in
  token order, a token's choices best first."""
  out, x = set(), np.asarray(x, np.float64)
  for b in range(x.shape[0]):
    seen = np.zeros(E, int)
    for l in range(x.shape[1]):
      for e in choices(m, m.router, x[b, l]):
        if seen[e] >= capacity:
          out.add((b, l, e))
        seen[e] += 1
  return out


def test_capacity_drops_exactly_the_assignments_over_capacity():
  m = build(dispatch="capacity", capacity_factor=0.5)
  x = inputs(4)
  C = dispatch.capacity_of(L, 2, E, 0.5)
  dropped = over_capacity(m, x, C)
  assert dropped  # the test needs drops
  y, aux = run(m, x)
  np.testing.assert_allclose(np.asarray(y), layer_ref(m, "softmax_topk", x, dropped),
                             atol=1e-5)
  assert abs(float(aux.stats.dropped) - len(dropped) / (B * L * 2)) < 1e-6
  # A token whose every choice was dropped gets zero: the residual carries it.
  lost = [(b, l) for b in range(B) for l in range(L)
          if all((b, l, e) in dropped for e in choices(m, m.router, np.asarray(x[b, l], np.float64)))]
  for b, l in lost:
    assert np.all(np.asarray(y)[b, l] == 0)


def test_capacity_dropping_is_causal():
  m = build(dispatch="capacity", capacity_factor=0.5)
  x = inputs(5)
  changed = x.at[:, L // 2:].set(inputs(6)[:, L // 2:])
  np.testing.assert_array_equal(np.asarray(run(m, x)[0])[:, :L // 2],
                                np.asarray(run(m, changed)[0])[:, :L // 2])


def test_decoding_one_token_at_a_time_never_drops():
  m = build(dispatch="capacity", capacity_factor=0.25)
  x = inputs(7)
  _, aux = run(m, x)
  assert float(aux.stats.dropped) > 0
  graphdef, state = nnx.split(m)
  step = jax.jit(lambda s, x, c: nnx.merge(graphdef, s)(x, cache=c))
  cache = m.init_cache(B, L)
  steps = []
  for t in range(L):
    y, cache = step(state, x[:, t:t + 1], cache)
    steps.append(y)
  np.testing.assert_allclose(np.concatenate(steps, 1), layer_ref(m, "softmax_topk", x),
                             atol=1e-5)


# -- the channel-mixer checks -------------------------------------------------------

VARIANTS = {
    "switch_capacity": dict(router="softmax_topk", top_k=1, dispatch="capacity"),
    "mixtral_dropless": dict(router="topk_softmax"),
    "deepseek_shared": dict(router="softmax_topk", num_experts=8, top_k=3, hidden=6,
                            shared_hidden=12, expert="gelu"),
    "qwen_shared_gate": dict(shared_hidden=8, shared_gate=True, normalize_gates=True),
    "v3_sigmoid_bias": dict(router="sigmoid_bias", route_scale=2.5),
    "expert_choice": dict(router="expert_choice", dispatch="capacity"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_channel_mixer_checks(variant):
  """Shape and dtype, jit == eager, determinism, gradients to every
  parameter (the router included), bf16 close to fp32 with fp32 logits."""
  m = build(**VARIANTS[variant])
  x = inputs(8)
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest).with_aux(x)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))) + aux.loss, y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(run(m, x)[0]), np.asarray(y), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(run(m, x)[0]), np.asarray(run(m, x)[0]))
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.abs(np.asarray(g)).max() > 0, f"no gradient for {jax.tree_util.keystr(path)}"
  xb = x.astype(jnp.bfloat16)
  assert jax.eval_shape(m.logits, xb).dtype == jnp.float32
  yb = run(m, xb)[0]
  assert yb.dtype == jnp.bfloat16
  err = np.abs(np.asarray(yb, np.float32) - np.asarray(y))
  assert np.median(err) < 0.02 * np.abs(np.asarray(y)).mean() + 1e-3, np.median(err)


def test_active_flops_count_the_chosen_experts_only():
  small, big = build(num_experts=4), build(num_experts=64)
  per_expert = small.experts.flops_per_token()
  assert per_expert == 2 * D * 12 * 3
  assert big.flops_per_token() - small.flops_per_token() == 2 * D * 60  # router only
  assert small.flops_per_token() == 2 * D * E + 2 * per_expert


@pytest.mark.parametrize("options,match", [
    ({"top_k": 5}, r"top_k=5 is larger than num_experts=4"),
    ({"capacity_factor": 0.0}, r"capacity_factor must be > 0"),
    ({"capacity_factor": -1.0}, r"capacity_factor must be > 0"),
    ({"router": "switch2"}, r"unknown router 'switch2'; choose one of \['softmax_topk'"),
    ({"dispatch": "ragged"}, r"unknown dispatch 'ragged'; choose one of"),
    ({"expert": "relu"}, r"unknown expert 'relu'"),
    ({"router": "expert_choice", "dispatch": "dropless"}, r"no dropless dispatch"),
    ({"shared_gate": True}, r"shared_gate=True needs a shared expert"),
    ({"num_experts": 0}, r"num_experts must be an int >= 1"),
])
def test_bad_options_are_clear_errors(options, match):
  with pytest.raises(ValueError, match=match):
    build(**options)


def test_bad_options_are_refused_by_the_config_before_anything_is_built():
  with pytest.raises(ValueError, match="top_k=9 is larger"):
    LMConfig(channel={"name": "moe", "top_k": 9})
  with pytest.raises(ValueError, match="option 'capacity_factor' must be float"):
    LMConfig(channel={"name": "moe", "capacity_factor": "big"})


def test_deepseek_v3_bias_steers_choice_not_gates_and_moves_toward_balance():
  m = build(router="sigmoid_bias", top_k=1)
  x = inputs(9)
  _, aux = run(m, x)
  load = np.asarray(aux.stats.load)
  m.update_balance(aux)
  np.testing.assert_allclose(np.asarray(m.bias[...]),
                             1e-3 * np.sign(load.mean() - load), atol=1e-9)
  # A large bias on expert 0 sends every token there, with gate s_0 / s_0 = 1.
  m.bias[...] = jnp.array([10.0, 0, 0, 0])
  y, aux = run(m, x)
  np.testing.assert_allclose(np.asarray(aux.stats.load), [1, 0, 0, 0])
  np.testing.assert_allclose(np.asarray(y), _expert(m, 0, np.asarray(x, np.float64)),
                             atol=1e-5)


def test_router_stats_follow_their_definitions():
  m = build(dispatch="capacity", capacity_factor=0.5)
  x = inputs(10)
  _, aux = run(m, x)
  z = np.asarray(x, np.float64) @ np.asarray(m.router_proj.kernel[...], np.float64)
  p = _softmax(z)
  top = np.argsort(-p, -1)[..., :2]
  load = np.bincount(top.ravel(), minlength=E) / top.size
  s = aux.stats
  np.testing.assert_allclose(np.asarray(s.load), load, atol=1e-6)
  np.testing.assert_allclose(float(s.balance_loss), E * (load * p.mean((0, 1))).sum(), rtol=1e-5)
  lse = np.log(np.exp(z).sum(-1))
  np.testing.assert_allclose(float(s.z_loss), (lse ** 2).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(s.entropy), -(p * np.log(p)).sum(-1).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(aux.loss), 0.01 * float(s.balance_loss)
                             + 1e-3 * float(s.z_loss), rtol=1e-6)


# -- in a language model ------------------------------------------------------------

def test_channel_pattern_cycles_and_the_model_returns_aux():
  moe = {"name": "moe", "num_experts": E, "hidden": 12, "dispatch": "capacity",
         "capacity_factor": 0.5}
  cfg = LMConfig(vocab_size=32, d_model=D, n_layers=3, channel=["swiglu", moe])
  assert [s[0] for s in cfg.channel_specs()] == ["swiglu", "moe", "swiglu"]
  model = DecoderLM(dataclasses.replace(cfg, n_layers=2), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 6)), jnp.int32)
  logits, aux = jax.jit(lambda s, t: nnx.merge(graphdef, s).with_aux(t))(state, tokens)
  assert list(aux) == [1] and logits.shape == (2, 6, 32)
  assert float(aux[1].stats.dropped) > 0  # full sequence: over capacity drops
  step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c))
  cache, steps = model.init_cache(2, 6), []
  for t in range(6):
    lg, cache = step(state, tokens[:, t:t + 1], cache)
    steps.append(lg)
  # Decoding drops nothing, so it equals the full forward of a roomy capacity.
  roomy = DecoderLM(dataclasses.replace(cfg, n_layers=2, channel=[
      "swiglu", {**moe, "capacity_factor": float(E)}]), rngs=nnx.Rngs(0))
  want = jax.jit(lambda s, t: nnx.merge(*nnx.split(roomy)[:1], s)(t))(
      nnx.split(roomy)[1], tokens)
  np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(want), atol=1e-5)


# -- in the trainer -------------------------------------------------------------------

def moe_run_config(run_dir: str, **moe_options):
  """The trainer tests' tiny model with MoE layers that move a DeepSeek-V3
  bias, at a constant learning rate (a resume may then change nothing)."""
  cfg = tiny_config(run_dir)
  moe = {"name": "moe", "num_experts": E, "hidden": 16, "router": "sigmoid_bias",
         "bias_update_rate": 0.01, "balance_weight": 0.01, **moe_options}
  return dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, channel=["swiglu", moe]),
      optimizer=dataclasses.replace(cfg.optimizer, schedule="constant"))


def test_remat_grad_accumulation_and_the_aux_loss_in_the_objective():
  """Remat recomputes a block whose non-parameter state (the V3 bias) the
  step only reads, and two micro-batches give the big batch's nll, loads
  and (with the nonlinear aux losses weighted 0) gradients; weighted, the
  aux losses enter the summed objective as count * aux loss."""
  from train.trainer.state import build as build_setup
  from train.trainer.step import accumulate
  batch = ToyIter().batch(0)
  outs = []
  for remat, accum, weight in ((False, 1, 0.0), (True, 2, 0.0), (False, 1, 1.0)):
    cfg = moe_run_config("unused", balance_weight=weight, z_weight=weight)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat))
    setup = build_setup(cfg)
    state = setup.init_state()
    outs.append(jax.jit(lambda p, setup=setup, b=state.buffers, a=accum: accumulate(
        setup.graphdef, p, b, batch, a))(state.params))
  (nll1, count, _, grads1, aux1), (nll2, _, _, grads2, aux2), weighted = outs
  np.testing.assert_allclose(float(nll2), float(nll1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(aux2[1].stats.load), np.asarray(aux1[1].stats.load))
  for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads1), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  s = weighted[4][1].stats
  np.testing.assert_allclose(float(weighted[2]), float(count) * float(s.balance_loss + s.z_loss),
                             rtol=1e-5)
  router = lambda g: np.asarray(g["blocks"][1]["channel"]["router_proj"]["kernel"][...])
  assert np.abs(router(weighted[3]) - router(grads1)).max() > 1e-3


def test_training_logs_moe_stats_and_a_resume_keeps_the_bias_exact(tmp_path, compile_cache):
  from train.trainer.checkpoint import Checkpointer
  from train.loop import train
  from train.results import markdown, row
  from train.trainer.state import build as build_setup
  run_dir = str(tmp_path / "run")
  cfg = moe_run_config(run_dir)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4,
                                                           checkpoint_every=2))
  summary = train(cfg, ToyIter(), eval_batches(), data_info={})
  log = os.path.join(run_dir, "metrics.jsonl")
  first = [json.loads(line) for line in open(log) if '"loss"' in line]
  assert [r["step"] for r in first] == [1, 2, 3, 4]
  for key in ("aux_loss", "moe/1/load_min", "moe/1/load_max", "moe/1/entropy",
              "moe/1/dropped", "moe/1/balance_loss", "moe/1/z_loss"):
    assert all(np.isfinite(r[key]) for r in first), key
  assert "moe/0/load_max" not in first[0]  # layer 0 is the dense swiglu
  assert 0 < first[0]["aux_loss"] and first[0]["moe/1/load_max"] >= 1 / E
  assert os.listdir(os.path.join(run_dir, "tb"))
  table = markdown([row("moe", {}, cfg, {"summary": summary, "status": "done"})])
  assert "aux loss" in table and f"{summary['aux_loss']:.4f}" in table

  def bias(step):
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=2, read_only=True)
    state, _ = ckpt.restore(step, build_setup(cfg).abstract_state)
    ckpt.close()
    return np.asarray(state.buffers["blocks"][1]["channel"]["bias"][...])

  b2, b4 = bias(2), bias(4)
  assert np.abs(b4).max() > 0 and not np.array_equal(b2, b4)
  # As if killed after the step-2 checkpoint: the rerun resumes there.
  import shutil
  shutil.rmtree(os.path.join(run_dir, "checkpoints", "4"))
  train(cfg, ToyIter(), eval_batches(), data_info={})
  second = [json.loads(line) for line in open(log) if '"loss"' in line]
  assert [r["loss"] for r in second] == [r["loss"] for r in first]
  np.testing.assert_array_equal(bias(4), b4)


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_moe_vs_dense_sweep_is_at_equal_active_flops_and_runs_at_smoke_size(
    tmp_path, compile_cache):
  """Every MoE config of the comparison costs the dense model's FLOPs per
  token (within 2%: the router, widths rounded) with more parameters; its
  Switch run (capacity, with drops) trains end to end at a smoke size and
  fills the table's auxiliary columns."""
  from train import sweep
  sw = sweep.load(os.path.join(CONFIGS, "sweeps", "moe_vs_dense.yaml"))
  models = {v.labels["variant"]: sw.config(v).model for v in sw.variants}
  assert sorted(models) == ["deepseek", "dense", "mixtral", "switch"]
  built = {k: nnx.eval_shape(lambda m=m: DecoderLM(m, rngs=nnx.Rngs(0)))
           for k, m in models.items()}
  dense = built.pop("dense")
  for name, m in built.items():
    assert abs(m.flops_per_token(64) / dense.flops_per_token(64) - 1) < 0.02, name
    assert m.num_params() > 2.5 * dense.num_params(), name
  keep = ["lr=0.003__switch"]
  smoke = ["train.steps=2", "train.batch_size=4", "data.seq_len=16",
           "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2"]
  one = dataclasses.replace(sw, variants=tuple(v for v in sw.variants if v.name in keep))
  [switch] = sweep.run_sweep(one, str(tmp_path), overrides=smoke, log=lambda _: None)["rows"]
  assert switch["status"] == "done"
  assert switch["aux_loss"] > 0 and 0 < switch["moe/load_max"] <= 1
  assert 0 <= switch["moe/dropped"] < 1 and switch["val_bpb"] is not None


def test_bench_moe_runs_at_smoke_size_and_reports_the_target(tmp_path, capsys):
  from train.bench import moe as bench_moe
  from train.cli import main
  out = str(tmp_path / "bench")
  assert main(["bench-moe", "--experts", "2,4", "--d-model", "8", "--hidden", "8",
               "--batch", "2", "--length", "8", "--repeats", "1", "--out", out]) == 0
  report = json.load(open(os.path.join(out, "bench_moe.json")))
  assert [(r["dispatch"], r["experts"]) for r in report["rows"]] == [
      ("dropless", 2), ("dropless", 4), ("capacity", 2), ("capacity", 4)]
  rows = {(r["dispatch"], r["experts"]): r for r in report["rows"]}
  # fixed active parameters: same FLOPs per token (but the router), more params
  assert rows["dropless", 4]["active_flops_per_token"] - rows["dropless", 2][
      "active_flops_per_token"] == 2 * 8 * 2
  assert rows["dropless", 4]["params"] > rows["dropless", 2]["params"]
  assert set(report["ratios"]) == {"dropless", "capacity"}
  md = open(os.path.join(out, "bench_moe.md")).read()
  assert "mixerlab bench-moe --experts 2,4" in md and f"at most {bench_moe.TARGET}x" in md
  with pytest.raises(ValueError, match="must each be >= top_k=2"):
    bench_moe.MoEBenchSpec(experts=(1, 4))
  capsys.readouterr()
  assert main(["bench-moe", "--dispatches", "dropless,sorted"]) == 2
  assert ("bench-moe: dispatches ['sorted'] unknown; choose from"
          in capsys.readouterr().err)
