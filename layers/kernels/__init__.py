"""Kernel selection.

An op (e.g. "attention") has an ordered list of implementations per
platform. Each implementation says why it declines a given call (wrong
platform, dtype, shape, ...); the first that accepts wins and the choice,
with every reason for skipping the ones before it, is logged once. The
pure-JAX reference accepts everything, so CPU always has a path.

A mixer exposes the choice as its `kernel` option: "auto" walks the list;
a name forces that implementation and fails loudly if it declines.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax

log = logging.getLogger("mixerlab.kernels")


@dataclasses.dataclass(frozen=True)
class Impl:
  """One implementation of an op.

  `declines(**query)` returns None when the implementation can run the
  call, or a short reason why not.
  """
  name: str
  fn: Callable
  declines: Callable[..., str | None] = lambda **_: None


@dataclasses.dataclass
class Op:
  name: str
  impls: dict[str, Impl]
  order: dict[str, tuple[str, ...]]  # platform -> preference order

  def names(self) -> list[str]:
    return list(self.impls)

  def check(self, requested: str) -> str:
    """`requested` if it is "auto" or an implementation's name, else a
    ValueError naming the choices."""
    if requested != "auto" and requested not in self.impls:
      raise ValueError(f"unknown {self.name} kernel {requested!r}; "
                       f"choose 'auto' or one of {self.names()}")
    return requested

  def choose(self, requested: str = "auto", platform: str | None = None,
             **query) -> Impl:
    platform = platform or jax.default_backend()
    if self.check(requested) != "auto":
      impl = self.impls[requested]
      reason = impl.declines(platform=platform, **query)
      if reason:
        raise ValueError(f"{self.name} kernel {requested!r} cannot run this "
                         f"call: {reason}")
      return impl
    order = self.order.get(platform, self.order["default"])
    skipped = []
    for name in order:
      impl = self.impls[name]
      reason = impl.declines(platform=platform, **query)
      if reason is None:
        _log_choice(self.name, platform, name, tuple(skipped))
        return impl
      skipped.append(f"{name}: {reason}")
    raise ValueError(f"no {self.name} kernel accepts this call on {platform}: "
                     + "; ".join(skipped))


_logged: set = set()


def _log_choice(op, platform, name, skipped):
  key = (op, platform, name, skipped)
  if key not in _logged:
    _logged.add(key)
    log.info("%s on %s: using %r%s", op, platform, name,
             f" (skipped {'; '.join(skipped)})" if skipped else "")
