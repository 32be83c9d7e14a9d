"""`mixers.state_bytes`: decode-state bytes per sequence, measured from the
cache a module allocates. Modules are built abstractly (`nnx.eval_shape`):
sizing a cache needs no weights."""

import jax.numpy as jnp
import pytest
from flax import nnx, struct

from arches.lm import DecoderLM, LMConfig
from layers import mixers


def test_attention_kv_cache_is_two_l_h_d_bytes():
  # 4 query heads sharing 2 kv heads of 16 channels: the cache holds k and v
  # for the kv heads only; the int32 position counter is shared by the batch.
  m = nnx.eval_shape(lambda: mixers.build("attention", 64, rngs=nnx.Rngs(0), num_heads=4,
                                           num_kv_heads=2))
  for context, dtype, size in [(100, jnp.float32, 4), (100, jnp.bfloat16, 2), (257, jnp.float32, 4)]:
    assert mixers.state_bytes(m, context, dtype) == 2 * context * 2 * 16 * size


def test_recurrent_state_is_constant_in_context():
  m = nnx.eval_shape(lambda: mixers.build("mamba", 32, rngs=nnx.Rngs(0)))
  short, long = mixers.state_bytes(m, 16), mixers.state_bytes(m, 4096)
  assert short == long > 0


@struct.dataclass
class _Cache:
  per_seq: jnp.ndarray
  pos: jnp.ndarray


class _Planted:
  """A cache of 3 fp32 numbers per sequence and a shared counter."""

  def __init__(self, extra):
    self.extra = extra  # per-sequence numbers a wrong count would miss

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    return _Cache(jnp.zeros((batch_size, 3 + self.extra), jnp.float32),
                  jnp.zeros((), jnp.int32))


@pytest.mark.parametrize("extra", [0, 2])
def test_counts_every_per_sequence_leaf_and_no_shared_one(extra):
  # A planted extra leaf changes the count; a count that included the
  # shared counter, or ignored a leaf, would not give 4 * (3 + extra).
  assert mixers.state_bytes(_Planted(extra), 10) == 4 * (3 + extra)


def test_whole_model_is_the_sum_of_its_layers_at_its_dtype():
  cfg = LMConfig(vocab_size=32, d_model=32, n_layers=3, dtype="bfloat16",
                 mixer=["mamba", {"name": "attention", "num_heads": 2}, "mamba"])
  model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  layers = sum(mixers.state_bytes(b.mixer, 64, jnp.bfloat16) for b in model.blocks)
  assert mixers.state_bytes(model, 64) == layers
  assert mixers.state_bytes(model, 128) - mixers.state_bytes(model, 64) == 2 * 64 * 32 * 2
