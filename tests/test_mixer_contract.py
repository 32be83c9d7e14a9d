"""Every registered sequence mixer passes every contract check."""

import pytest
from flax import nnx

from layers import mixers
from mixer_contract import CHECKS, D_MODEL


def maker(name):
  return lambda seed: mixers.build(name, D_MODEL, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("name", mixers.names())
def test_contract(name, check):
  CHECKS[check](maker(name))
