"""The device layout a model is traced under, for the few places in the
library that must know it.

Layers and arches name dimensions logically ("batch", "length", "heads",
...) and never build a mesh. The trainer enters `use(Layout(mesh, rules))`
around the forward; inside it

  * `constrain(x, names)` pins an activation to the mesh axes its logical
    names map to (block boundaries, so XLA does not guess the layout of
    the residual stream);
  * `current()` gives kernels that run per shard under `shard_map` (ring
    attention and the linear-attention state hand-off in
    `layers.kernels.context_parallel`, expert dispatch in
    `layers.channel.dispatch`) the mesh and the specs of their inputs.

Outside `use` (notebooks, generation, every single-device call) the layout
is None and all of these are the plain single-device code.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical names of activation dimensions that parameters never have.
BATCH, LENGTH = "batch", "length"


@dataclasses.dataclass(frozen=True)
class Layout:
  """mesh, and `rules`: logical name -> mesh axis or tuple of mesh axes.
  Mesh axes of size 1 are left out of every spec."""
  mesh: Mesh
  rules: Mapping[str, str | tuple[str, ...]]

  def axes(self, name: str | None) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that logical `name` is split over."""
    target = self.rules.get(name, ()) if name is not None else ()
    target = (target,) if isinstance(target, str) else tuple(target)
    return tuple(a for a in target if self.mesh.shape[a] > 1)

  def size(self, name: str) -> int:
    return int(np.prod([self.mesh.shape[a] for a in self.axes(name)]))

  def spec(self, *names: str | None) -> P:
    parts = []
    for name in names:
      axes = self.axes(name)
      parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*parts)


_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar(
    "layout", default=None)


@contextlib.contextmanager
def use(layout: Layout | None):
  """Trace the model on `layout` while inside this block (None: one device)."""
  token = _LAYOUT.set(layout)
  try:
    yield
  finally:
    _LAYOUT.reset(token)


def current() -> Layout | None:
  return _LAYOUT.get()


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """`x` pinned to the mesh axes of its logical dimension `names` (one per
  dimension) under the current layout; `x` itself outside one."""
  layout = current()
  if layout is None:
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(layout.mesh, layout.spec(*names)))
