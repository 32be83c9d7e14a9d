"""The error type for a bad configuration, and the field checks the config
dataclasses (`arches.lm.LMConfig`, `train.config`) run when they are built.

    check_fields(self, "train", steps=at_least(1), eval_lengths=each(at_least(1)))
    # a bad value raises ConfigError("train.steps=0 must be >= 1", "train.steps")

`ConfigError` is the project's one user-input error: `mixerlab` prints it
as a one-line `error:` instead of a traceback. It lives here, under arches/,
so that the model config can raise it and train/ (which depends on arches)
can too.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Sequence
from typing import Any

from layers.registry import check_type, type_name


class ConfigError(ValueError):
  """A configuration value is not allowed, or a file it names is unusable.

  `keys`: the dotted config keys the error is about ("model.d_model"), the
  one at fault first; `train.configs.load` uses them to say which file or
  command-line override set them.
  """

  def __init__(self, message: str, *keys: str):
    super().__init__(message)
    self.keys = keys


@dataclasses.dataclass(frozen=True)
class Rule:
  """A test of a field's value and the phrase saying what it allows."""
  ok: Callable[[Any], bool]
  allowed: str


def at_least(lo) -> Rule:
  return Rule(lambda v: v >= lo, f">= {lo}")


def above(lo) -> Rule:
  return Rule(lambda v: v > lo, f"> {lo}")


def within(lo, hi, *, open_lo: bool = False, open_hi: bool = False) -> Rule:
  """lo <= v <= hi, either end open."""
  def ok(v):
    return (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
  return Rule(ok, f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")


def one_of(choices: Sequence) -> Rule:
  choices = tuple(choices)
  return Rule(lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


def each(rule: Rule) -> Rule:
  return Rule(lambda v: all(rule.ok(x) for x in v), f"a list of values {rule.allowed}")


def optional(rule: Rule) -> Rule:
  return Rule(lambda v: v is None or rule.ok(v), f"null or {rule.allowed}")


NON_EMPTY = Rule(bool, "non-empty")


@functools.cache
def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def check_fields(obj, section: str, **rules: Rule) -> None:
  """Raise ConfigError unless every field of the dataclass `obj` fits its
  type annotation and the rule given for it; errors name `section.field`."""
  hints = _hints(type(obj))
  unknown = rules.keys() - hints.keys()
  if unknown:
    raise TypeError(f"rules for fields {sorted(unknown)} that {type(obj).__name__} lacks")
  for f in dataclasses.fields(obj):
    value, key = getattr(obj, f.name), f"{section}.{f.name}"
    if not check_type(value, hints[f.name]):
      raise ConfigError(f"{key}={value!r} must be {type_name(hints[f.name])}, not "
                        f"{type(value).__name__}", key)
    rule = rules.get(f.name)
    if rule is not None and not rule.ok(value):
      raise ConfigError(f"{key}={value!r} must be {rule.allowed}", key)
