"""Expert parallelism: on 8 simulated CPU devices, data x expert and fsdp x
expert meshes train a model with capacity-dispatched MoE layers (tokens
sent to their experts' devices with all_to_all inside shard_map) to the
losses of one device, with the expert weights really split; and the mesh
errors that must come before anything runs."""

import dataclasses

import pytest

from fresh_process import result, start_on_cpu_devices
from trainer_fixtures import ToyIter, cache_env, compile_cache, tiny_config  # noqa: F401
from train.config import MeshConfig
from train.trainer.sharding import check_expert_parallel, shard_batch
from train.trainer.state import build
from train.trainer.step import make_train_step

MOE = {"name": "moe", "num_experts": 4, "hidden": 16, "dispatch": "capacity",
       "capacity_factor": 1.0, "router": "sigmoid_bias", "bias_update_rate": 0.01}


def moe_config(mesh_cfg: MeshConfig):
  cfg = tiny_config("unused")
  return dataclasses.replace(
      cfg, mesh=mesh_cfg, model=dataclasses.replace(cfg.model, channel=["swiglu", MOE]))


def _losses_and_experts(mesh_cfg):
  """Four steps on a mesh: the losses, the dropped fraction of the MoE
  layer, the expert weights' spec and per-device shard shape, and whether
  the step sends tokens with all_to_all."""
  setup = build(moe_config(mesh_cfg))
  state, it, step = setup.init_state(), ToyIter(), make_train_step(setup)
  hlo = step.lower(state, shard_batch(it.batch(0), setup.mesh)).as_text()
  losses = []
  for _ in range(4):
    state, m = step(state, shard_batch(next(it), setup.mesh))
    losses.append(float(m["loss"]))
  up = state.params["blocks"][1]["channel"]["experts"]["up"][...]
  return {"losses": losses, "dropped": float(m["moe/1/dropped"]),
          "spec": str(tuple(up.sharding.spec)),
          "shard": list(up.addressable_shards[0].data.shape),
          "all_to_all": "all_to_all" in hlo}


CHILD = r"""
import json, sys
sys.path.insert(0, "tests")
import jax
from test_moe_sharding import _losses_and_experts, moe_config
from train.config import MeshConfig
from train.trainer.state import build
assert len(jax.devices()) == 8, jax.devices()
out = {name: _losses_and_experts(MeshConfig(**mesh)) for name, mesh in
       (("data_x_expert", dict(data=2, expert=4)), ("fsdp_x_expert", dict(fsdp=2, expert=4)))}
try:
  build(moe_config(MeshConfig(data=1, expert=8)))
except ValueError as e:
  out["error"] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_expert_parallel_meshes_match_one_device(compile_cache):
  proc = start_on_cpu_devices(CHILD, 8, cache_env(compile_cache))
  one = _losses_and_experts(MeshConfig())  # meanwhile, here
  res = result(proc, timeout=900)
  assert one["shard"] == [4, 32, 16] and one["dropped"] > 0  # capacity does drop
  assert not one["all_to_all"]
  # Experts split 4 ways (one per device of the expert axis), and under
  # fsdp 2 their d_model rows in halves too (axes of size 1 are not named).
  assert res["data_x_expert"]["spec"] == "('expert', None, None)"
  assert res["fsdp_x_expert"]["spec"] == "('expert', 'fsdp', None)"
  assert res["data_x_expert"]["shard"] == [1, 32, 16]
  assert res["fsdp_x_expert"]["shard"] == [1, 16, 16]
  for name in ("data_x_expert", "fsdp_x_expert"):
    for a, b in zip(one["losses"], res[name]["losses"], strict=True):
      assert abs(a - b) <= 1e-5, (name, one, res[name])
    assert abs(res[name]["dropped"] - one["dropped"]) <= 1e-6
    assert res[name]["all_to_all"], name
  assert "mesh.expert=8 does not divide the num_experts=4" in res["error"]


def test_expert_axis_errors_come_before_anything_runs():
  cfg = moe_config(MeshConfig())
  with pytest.raises(ValueError, match=r"mesh.expert=3 does not divide the "
                     r"num_experts=4 of the moe layer 1"):
    check_expert_parallel(cfg.model, 3)
  dropless = dataclasses.replace(cfg.model, channel=["swiglu", {**MOE, "dispatch": "dropless"}])
  with pytest.raises(ValueError, match="needs dispatch='capacity' in the moe layer 1"):
    check_expert_parallel(dropless, 2)
  check_expert_parallel(dropless, 1)  # no expert axis: any dispatch
