"""Tensor and sequence parallelism: every layout of data, fsdp, tensor and
sequence axes trains a tiny attention + RetNet model to the one-device losses
on 8 simulated devices, with its weights and activations really split; and
the config errors for layouts a model cannot take."""

import dataclasses

import jax
import pytest

from fresh_process import result, start_on_cpu_devices
from trainer_fixtures import (ToyIter, cache_env, compile_cache,  # noqa: F401
                              tiny_config)
from arches.lm import Block, LMConfig
from arches.validation import ConfigError
from layers.kernels import flash, linear_attention as la
from layers.params import Dense
from train.config import Config, MeshConfig
from train.trainer.sharding import make_mesh, shard_batch
from train.trainer.state import build
from train.trainer.step import make_train_step

H = 4  # heads of both mixers
MODEL = LMConfig(vocab_size=64, d_model=32, n_layers=2,
                 mixer=[{"name": "attention", "num_heads": H},
                        {"name": "retnet", "num_heads": H}],
                 channel={"name": "swiglu", "hidden": 64})
LAYOUTS = {"data2_tensor4": dict(data=2, tensor=4),
           "fsdp2_tensor2_data2": dict(fsdp=2, tensor=2, data=2),
           "sequence4_data2": dict(sequence=4, data=2),
           "sequence2_tensor2_data2": dict(sequence=2, tensor=2, data=2),
           "fsdp4_sequence2": dict(fsdp=4, sequence=2)}


def parallel_config(mesh: dict) -> Config:
  return dataclasses.replace(tiny_config("unused"), model=MODEL, mesh=MeshConfig(**mesh))


SEEN: list = []  # (what, shape) reports of the recording below


def record_splits():
  """From now on, every Dense whose output has a "heads" axis and every
  block report into SEEN how the compiler split their outputs (the shard
  shape), and the attention and linear-attention kernels the length of the
  queries they get (the whole length on one device, L / sequence per shard
  in their sequence-parallel forms)."""
  call, with_aux = Dense.__call__, Block.with_aux
  flash_lse, linear = flash.attention_lse, la.causal_linear_attention

  def report(what, y):
    jax.debug.inspect_array_sharding(
        y, callback=lambda s, shape=y.shape: SEEN.append((what, s.shard_shape(shape))))

  def dense(self, x):
    y = call(self, x)
    if "heads" in self.kernel.get_metadata()["logical_axes"][self.n_in:]:
      report("heads", y)
    return y

  def block(self, x, **kw):
    y, aux = with_aux(self, x, **kw)
    report("block", y)
    return y, aux

  def kernel(fn):
    return lambda q, *a, **kw: (SEEN.append(("kernel", (q.shape[1],))), fn(q, *a, **kw))[1]

  Dense.__call__, Block.with_aux = dense, block
  flash.attention_lse, la.causal_linear_attention = kernel(flash_lse), kernel(linear)


def run_layout(mesh: dict, start=None) -> dict:
  """Three steps on a layout from `start` (a host copy of an initial state;
  None: the layout's own init): the losses, the per-device shard shape of
  the attention's query weight, and what `record_splits` saw of the step."""
  setup = build(parallel_config(mesh))
  it = ToyIter()
  state = (setup.init_state() if start is None
           else jax.device_put(start, setup.state_sharding))
  SEEN.clear()  # the recording runs as the step compiles
  step = make_train_step(setup)
  losses = []
  for _ in range(3):
    state, m = step(state, shard_batch(next(it), setup.mesh))
    losses.append(float(m["loss"]))
  q = state.params["blocks"][0]["mixer"]["proj"]["q"]["kernel"][...]
  return {"losses": losses, "q_shard": list(q.addressable_shards[0].data.shape),
          "seen": sorted({(what, tuple(shape)) for what, shape in SEEN})}


CHILD = r"""
import json, sys
sys.path.insert(0, "tests")
import jax
from test_parallel_layouts import LAYOUTS, record_splits, run_layout
assert len(jax.devices()) == 8, jax.devices()
from test_parallel_layouts import build, parallel_config
# One init for all layouts (the same values on any mesh): compiles are the cost.
start = jax.device_get(build(parallel_config(dict(data=8))).init_state())
record_splits()
print("RESULT " + json.dumps({name: run_layout(mesh, start)
                              for name, mesh in LAYOUTS.items()}))
"""


def test_layouts_match_one_device_and_really_split(compile_cache):
  proc = start_on_cpu_devices(CHILD, 8, cache_env(compile_cache))
  one = run_layout(dict(data=1))  # meanwhile, here
  res = result(proc, timeout=900)
  B, L, D = 8, 32, 32
  for name, mesh in LAYOUTS.items():
    got = res[name]
    for a, b in zip(one["losses"], got["losses"], strict=True):
      assert abs(a - b) <= 1e-5, (name, one["losses"], got["losses"])
    t, s = mesh.get("tensor", 1), mesh.get("sequence", 1)
    batch = B // (mesh.get("data", 1) * mesh.get("fsdp", 1))
    # Weights: the query projection [d_model, heads, head_dim] by heads.
    assert got["q_shard"][1] == H // t, (name, got["q_shard"])
    # Activations as compiled: q/k/v/gates by heads, blocks by batch and
    # length; the kernels run on L / sequence tokens (ring, state hand-off).
    seen = {what: {tuple(shape) for w, shape in got["seen"] if w == what}
            for what in ("heads", "block", "kernel")}
    assert {shape[2] for shape in seen["heads"]} == {H // t}, (name, seen)
    assert seen["block"] == {(batch, L // s, D)}, (name, seen)
    assert seen["kernel"] == {(L // s,)}, (name, seen)


def test_layout_errors_name_axis_and_sizes():
  gla = {"name": "gla", "num_heads": 3}
  with pytest.raises(ConfigError, match=r"mesh.tensor=2: mixer 'mamba' \(layer 0\) "
                     r"cannot be split over a tensor axis"):
    dataclasses.replace(parallel_config({}), model=LMConfig(mixer="mamba"),
                        mesh=MeshConfig(tensor=2))
  with pytest.raises(ConfigError, match=r"mesh.sequence=2: mixer 'rwkv6' .*"
                     r"sequence_parallel is False.*attention, gla"):
    dataclasses.replace(parallel_config({}), model=LMConfig(mixer="rwkv6"),
                        mesh=MeshConfig(sequence=2))
  with pytest.raises(ConfigError, match=r"mesh.tensor=2 does not divide the 'heads' "
                     r"dimension \(3\) of parameter blocks/0/mixer/"):
    dataclasses.replace(parallel_config({}), model=LMConfig(mixer=gla, d_model=24),
                        mesh=MeshConfig(tensor=2))
  with pytest.raises(ConfigError, match=r"mesh.sequence=3 does not divide "
                     r"data.seq_len=32"):
    parallel_config(dict(sequence=3))
  with pytest.raises(ConfigError, match=r"mesh.tensor=0 must be >= 1"):
    MeshConfig(tensor=0)
  with pytest.raises(ConfigError, match=r"mesh.data=1 x mesh.fsdp=1 x mesh.expert=1 x "
                     r"mesh.sequence=1 x mesh.tensor=2 makes 2 devices; the mesh "
                     r"must cover the 8 available"):
    make_mesh(MeshConfig(data=1, tensor=2), jax.devices() * 8)
  with pytest.raises(ConfigError, match=r"mesh.tensor=3 must be >= 1 and divide the 8"):
    make_mesh(MeshConfig(tensor=3), jax.devices() * 8)
