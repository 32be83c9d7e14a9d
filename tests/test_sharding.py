"""Sharding: rules from logical axes to the mesh, mesh errors, and the same
train step on 8 simulated devices (data x fsdp) matching one device."""

import dataclasses

import jax
import pytest
from jax.sharding import PartitionSpec as P

from fresh_process import result, start_on_cpu_devices
from trainer_fixtures import (ToyIter, cache_env, compile_cache,  # noqa: F401
                              tiny_config)
from train.config import MeshConfig
from train.trainer.sharding import check_rules, make_mesh, partition_spec, shard_batch
from train.trainer.state import build
from train.trainer.step import make_train_step

RULES = {"embed": "fsdp", "mlp": "data"}


def test_partition_spec_follows_rules_and_divisibility():
  mesh = {"data": 2, "fsdp": 4}
  assert partition_spec(("vocab", "embed"), (64, 32), mesh, RULES) == P(None, "fsdp")
  assert partition_spec(("embed", "mlp"), (32, 6), mesh, RULES) == P("fsdp", "data")
  assert partition_spec(("embed", "mlp"), (30, 7), mesh, RULES) == P(None, None)
  # One mesh axis per array: the second "embed" stays replicated.
  assert partition_spec(("embed", "embed"), (8, 8), mesh, RULES) == P("fsdp", None)
  assert partition_spec(("norm",), (32,), mesh, RULES) == P(None)
  assert partition_spec(None, (), mesh, RULES) == P()
  with pytest.raises(ValueError, match="mesh axes are"):
    check_rules({"embed": "model"})
  with pytest.raises(ValueError, match="logical axes are"):
    check_rules({"d_model": "fsdp"})


def test_mesh_errors_name_the_problem():
  assert dict(make_mesh(MeshConfig()).shape) == {
      "data": len(jax.devices()), "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1}
  with pytest.raises(ValueError, match="fsdp=3 must be >= 1 and divide"):
    make_mesh(MeshConfig(fsdp=3), jax.devices() * 4)
  with pytest.raises(ValueError, match="makes 8 devices; the mesh must cover the 1 "
                     "available"):
    make_mesh(MeshConfig(data=8), jax.devices()[:1])


def _losses_and_embedding(mesh_cfg):
  """Four steps of the tiny model on a mesh; the losses and the embedding's
  spec and per-device shard shape."""
  cfg = dataclasses.replace(tiny_config("unused"), mesh=mesh_cfg)
  setup = build(cfg)
  state, it, step = setup.init_state(), ToyIter(), make_train_step(setup)
  losses = []
  for _ in range(4):
    state, m = step(state, shard_batch(next(it), setup.mesh))
    losses.append(float(m["loss"]))
  emb = state.params["embed"]["embedding"][...]
  return {"losses": losses, "spec": str(tuple(emb.sharding.spec)),
          "shard": list(emb.addressable_shards[0].data.shape)}


CHILD = r"""
import json, sys
sys.path.insert(0, "tests")
import jax
from test_sharding import _losses_and_embedding
from train.config import MeshConfig
assert len(jax.devices()) == 8, jax.devices()
print("RESULT " + json.dumps(_losses_and_embedding(MeshConfig(data=2, fsdp=4))))
"""


def test_eight_devices_match_one(compile_cache):
  proc = start_on_cpu_devices(CHILD, 8, cache_env(compile_cache))
  one = _losses_and_embedding(MeshConfig(data=1, fsdp=1))  # meanwhile, here
  mesh = result(proc, timeout=600)
  assert mesh["spec"] == "(None, 'fsdp')" and mesh["shard"] == [64, 8]  # 32 / fsdp 4
  assert one["shard"] == [64, 32]
  for a, b in zip(one["losses"], mesh["losses"]):
    assert abs(a - b) < 1e-5, (one, mesh)
