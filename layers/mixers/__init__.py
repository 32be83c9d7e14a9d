"""Sequence-mixer registry.

    from layers import mixers
    mixers.names()                       # ['attention', ...]
    m = mixers.build("attention", 64, rngs=nnx.Rngs(0), num_heads=4)
    mixers.state_bytes(m, context=1024)  # decode-state bytes per sequence

Adding a mixer: write one module in this package that subclasses
`layers.mixers.base.Mixer` and decorate the class with
`@register("name")`. Every module here is imported on the registry's
first lookup, so the contract suite, configs, sweeps and benchmarks pick
it up.
"""

from __future__ import annotations

import importlib
import pkgutil

from flax import nnx

from layers.mixers.base import Mixer, MixerInfo, state_bytes
from layers.registry import Registry


def _import_mixers() -> None:
  for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if m.name != "base":
      importlib.import_module(f"{__name__}.{m.name}")


REGISTRY: Registry[Mixer] = Registry("sequence mixer", ("d_model",),
                                     load=_import_mixers)
register = REGISTRY.register
names = REGISTRY.names
options = REGISTRY.options
validate = REGISTRY.validate


def build(name: str, d_model: int, *, rngs: nnx.Rngs, **options) -> Mixer:
  """Build the mixer `name` for width `d_model` with validated options."""
  return REGISTRY.build(name, d_model, rngs=rngs, **options)


def info(name: str) -> MixerInfo:
  return REGISTRY.get(name).info
