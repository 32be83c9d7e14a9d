"""Sequence-mixer registry.

    from layers import mixers
    mixers.names()                       # ['attention', ...]
    m = mixers.build("attention", 64, rngs=nnx.Rngs(0), num_heads=4)

Adding a mixer: write one module in this package that subclasses
`layers.mixers.base.Mixer` and decorate the class with
`@register("name")`. Every module here is imported on package import, so
the contract suite, configs, sweeps and benchmarks pick it up.
"""

from __future__ import annotations

import importlib
import pkgutil

from flax import nnx

from layers.mixers.base import Mixer, MixerInfo
from layers.registry import Registry

REGISTRY: Registry[Mixer] = Registry("sequence mixer", ("d_model",))
register = REGISTRY.register
names = REGISTRY.names
options = REGISTRY.options
validate = REGISTRY.validate


def build(name: str, d_model: int, *, rngs: nnx.Rngs, **options) -> Mixer:
  """Build the mixer `name` for width `d_model` with validated options."""
  return REGISTRY.build(name, d_model, rngs=rngs, **options)


def info(name: str) -> MixerInfo:
  return REGISTRY.get(name).info


for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
  if _m.name != "base" and not _m.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_m.name}")
