"""One home per shared block: mixer modules import no other mixer module,
segment starts have one meaning, the attention family's options are one
dataclass, and kernel choices are one option name checked at config load."""

import ast
import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fresh_process import run_python
from layers import mixers
from layers.blocks.attention import AttentionOptions
from layers.positions import segment_positions, segment_starts
from layers.registry import OptionError

MIXERS = pathlib.Path(mixers.__file__).parent
# What a mixer module may take from its own package: the registry's
# `register` and the contract. Everything shared lives in layers.blocks (or
# positions, params, norms, kernels).
ALLOWED = {"layers.mixers.register", "layers.mixers.base"}


def sibling_imports(source: str) -> list[str]:
  """Names under layers.mixers that `source` imports, beyond ALLOWED."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ImportFrom) and node.module == "layers.mixers":
      names = [f"layers.mixers.{a.name}" for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    else:
      continue
    found += [n for n in names
              if n.startswith("layers.mixers.") and n not in ALLOWED]
  return found


def test_no_mixer_module_imports_another():
  bad = {p.name: sibling_imports(p.read_text()) for p in MIXERS.glob("*.py")}
  assert not {k: v for k, v in bad.items() if v}, bad


@pytest.mark.parametrize("planted", [
    "from layers.mixers.attention import Attention",
    "from layers.mixers import attention",
    "import layers.mixers.mamba",
    "def f():\n  from layers.mixers.rwkv import wkv6",
])
def test_sibling_import_check_catches_planted_imports(planted):
  ok = "from layers.mixers import register\nfrom layers.mixers.base import Mixer\n"
  assert sibling_imports(ok) == []
  assert sibling_imports(ok + planted)


def test_blocks_import_before_the_registry_in_a_fresh_process():
  """A block module imports the contract, and the registry imports the
  mixers that import blocks: importing a block first must not cycle."""
  r = run_python("import layers.blocks.sparse, layers.blocks.linear\n"
                 "from layers import mixers\n"
                 "assert 'gla' in mixers.names() and 'bigbird' in mixers.names()\n",
                 timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]


def test_segment_starts_include_the_row_start():
  seg = jnp.asarray([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5], [1, 2, 2, 1, 1, 1]])
  want = np.array([[1, 0, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0]],
                  bool)
  np.testing.assert_array_equal(segment_starts(seg), want)
  np.testing.assert_array_equal(segment_positions(seg) == 0, want)


ATTENTION_FAMILY = ["attention", "sliding_window", "attention_sinks", "strided",
                    "bigbird", "dilated"]


@pytest.mark.parametrize("name", ATTENTION_FAMILY)
def test_attention_family_offers_every_attention_option(name):
  options = mixers.options(name)
  for f in dataclasses.fields(AttentionOptions):
    assert f.name in options, f"{name} lacks attention option {f.name}"
    assert options[f.name].default == f.default


def test_sparse_mixers_take_out_bias_like_dense_attention():
  m = mixers.build("strided", 16, rngs=nnx.Rngs(0), out_bias=True, stride=4,
                   summary=1, num_heads=2)
  assert m.proj.o.bias is not None and m.proj.q.bias is None
  assert mixers.build("strided", 16, rngs=nnx.Rngs(0)).proj.o.bias is None


def test_attention_options_are_checked_at_validation():
  with pytest.raises(OptionError, match="multiple of num_kv_heads=3"):
    mixers.validate("sliding_window", {"num_heads": 4, "num_kv_heads": 3})
  with pytest.raises(OptionError, match="num_heads must be >= 1"):
    mixers.validate("attention", {"num_heads": 0})
  with pytest.raises(OptionError, match="'attn'"):  # flat fields only
    mixers.validate("attention", {"attn": AttentionOptions()})


def kernel_options():
  return [(name, key, op) for name in mixers.names()
          for key, op in mixers.REGISTRY.get(name).kernel_ops.items()]


def test_kernel_choice_is_one_option_name():
  assert not [n for n in mixers.names() if "form" in mixers.options(n)]
  covered = {name for name, _, _ in kernel_options()}
  with_kernel = {n for n in mixers.names() if "kernel" in mixers.options(n)}
  assert with_kernel == covered, with_kernel ^ covered


@pytest.mark.parametrize("name,key,op", kernel_options(),
                         ids=lambda v: getattr(v, "name", v))
def test_kernel_names_are_checked_at_validation(name, key, op):
  for ok in ["auto", *op.names()]:
    mixers.validate(name, {key: ok})
  with pytest.raises(OptionError, match=rf"unknown {op.name} kernel 'nope'.*"
                     + op.names()[0]):
    mixers.validate(name, {key: "nope"})
