"""Every registered sequence mixer passes every contract check."""

import pytest
from flax import nnx

from layers import mixers
from mixer_contract import CHECKS, D_MODEL


# Mixer defaults are the sizes of their papers (a 4096-token window, blocks
# of 64, ...). At the contract's 16 tokens those would hide the sparse
# paths, so each such mixer is checked with options that wrap its ring,
# cross several blocks and fill several buckets.
SMALL = {
    "sliding_window": {"window": 6},
    "attention_sinks": {"window": 6, "sinks": 2},
    "strided": {"stride": 4, "summary": 1},
    "bigbird": {"block_size": 2, "window": 1, "global_blocks": 1,
                "random_blocks": 1},
    "dilated": {"segment_lengths": (4, 16), "dilation_rates": (1, 4)},
    "lsh": {"n_buckets": 2, "chunk": 4},
    "performer": {"num_features": 64},
    "rwkv6": {"head_dim": 16},
}


def maker(name):
  options = SMALL.get(name, {})
  return lambda seed: mixers.build(name, D_MODEL, rngs=nnx.Rngs(seed), **options)


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("name", mixers.names())
def test_contract(name, check):
  CHECKS[check](maker(name))
