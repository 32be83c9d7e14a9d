"""The shared converter pieces (arches/convert.py), without torch: the
tensor helpers' layouts, both-sides completeness checks, and the family
table behind `load`. The HF reference tests (test_hf_*.py) check the whole
conversions against transformers."""

import importlib
import inspect
from types import SimpleNamespace

import numpy as np
import pytest

from arches import convert
from arches.lm import LMConfig


def test_dense_transposes_and_splits_the_torch_layout():
  w_OxI = np.arange(24, dtype=np.float32).reshape(6, 4)  # torch Linear [out, in]
  b_O = np.arange(6, dtype=np.float32)
  got = convert.dense(w_OxI, b_O, out_shape=(2, 3))
  np.testing.assert_array_equal(got["kernel"], w_OxI.T.reshape(4, 2, 3))
  np.testing.assert_array_equal(got["bias"], b_O.reshape(2, 3))
  # x @ kernel is torch's x @ W.T + b, with the output split as given.
  x = np.ones(4, np.float32)
  np.testing.assert_array_equal(
      np.einsum("i,ihk->hk", x, got["kernel"]) + got["bias"], (w_OxI @ x + b_O).reshape(2, 3))
  into_heads = convert.dense(w_OxI.T.copy(), in_shape=(2, 3))  # [4, 6] -> kernel [2, 3, 4]
  np.testing.assert_array_equal(into_heads["kernel"], w_OxI.reshape(2, 3, 4))
  assert "bias" not in into_heads


def test_conv_maps_a_depthwise_torch_conv1d():
  w_Cx1xK = np.arange(12, dtype=np.float32).reshape(3, 1, 4)
  sd = convert.Tensors({"c.weight": w_Cx1xK})
  got = convert.conv(sd, "c")
  assert set(got) == {"weight"}
  np.testing.assert_array_equal(got["weight"], w_Cx1xK[:, 0].T)  # [K, C]


def test_tensors_name_what_is_missing_and_what_is_left_over():
  sd = convert.Tensors({"model.a.weight": np.ones(2), "model.b.weight": np.ones(2),
                        "lm_head.weight": np.ones(2)}, strip="model.")
  assert sd.get("a.bias") is None
  with pytest.raises(ValueError, match=r"no tensor 'a.bias' \(with or without the prefix 'model.'\)"):
    sd["a.bias"]
  sd["a.weight"], sd["lm_head.weight"]
  with pytest.raises(ValueError, match=r"not used: \['model.b.weight'\]"):
    sd.finish()
  sd["b.weight"]
  sd.finish()


def test_a_tied_head_must_equal_the_embedding():
  cfg = LMConfig(vocab_size=3, d_model=2, n_layers=1, tie_embeddings=True)
  emb = np.arange(6, dtype=np.float32).reshape(3, 2)
  tensors = lambda head: convert.Tensors(
      {"emb.weight": emb, "norm.weight": np.ones(2), "lm_head.weight": head})
  params = convert.lm_params(tensors(emb.copy()), cfg, {}, embed="emb", final_norm="norm")
  assert "head" not in params
  with pytest.raises(ValueError, match="lm_head.weight differs from the embedding"):
    convert.lm_params(tensors(emb + 1), cfg, {}, embed="emb", final_norm="norm")


def test_load_names_the_supported_model_types():
  fake = SimpleNamespace(config=SimpleNamespace(model_type="bert"))
  with pytest.raises(ValueError, match=r"model_type 'bert' has no converter; supported: \['jamba', 'llama'"):
    convert.load(fake)


@pytest.mark.parametrize("module", sorted(set(convert.FAMILIES.values())))
def test_every_family_has_the_one_converter_signature(module):
  from_hf = importlib.import_module(module).from_hf
  assert list(inspect.signature(from_hf).parameters) == ["config", "state_dict"]
