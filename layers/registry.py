"""Named registries with validated options.

Mixers, channel mixers and position schemes are all built by name from a
registry. A registered constructor's keyword-only parameters (after the
required positional ones) are its *options*; their annotations are the
option types. `build` checks names and types before calling, so a typo in a
config file fails with a message that names the bad key and the accepted
ones instead of a TypeError deep inside a module.

A parameter annotated with a dataclass (e.g. `attn: AttentionOptions`)
contributes that dataclass's fields as flat options: options shared by a
family are declared once and `build` regroups them. A constructor may also
define `check_options(options)` (a classmethod) for checks that need more
than a type, such as kernel names.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
import inspect
import types
import typing
from typing import Any, Callable, Generic, Literal, TypeVar, Union

T = TypeVar("T")


class OptionError(TypeError, ValueError):
  """An option is unknown or has the wrong type.

  Subclasses both TypeError and ValueError so callers can catch either.
  """


def _close(word: str, choices) -> str:
  close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
  return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def type_name(annotation: Any) -> str:
  if annotation is inspect.Parameter.empty:
    return "any"
  if isinstance(annotation, type):
    return annotation.__name__
  return str(annotation).replace("typing.", "")


def check_type(value: Any, annotation: Any) -> bool:
  """True when `value` fits `annotation` (the subset configs use)."""
  if annotation is inspect.Parameter.empty or annotation is Any:
    return True
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  if origin in (Union, types.UnionType):
    return any(check_type(value, a) for a in args)
  if origin is Literal:
    return value in args
  if origin in (tuple, list):
    if not isinstance(value, (tuple, list)):
      return False
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
      return all(check_type(v, args[0]) for v in value)
    if origin is tuple and args:
      return len(value) == len(args) and all(
          check_type(v, a) for v, a in zip(value, args))
    return all(check_type(v, args[0]) for v in value) if args else True
  if origin is dict or annotation is dict:
    return isinstance(value, Mapping)
  if annotation is type(None):
    return value is None
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(annotation, type):
    return isinstance(value, annotation)
  return True


@dataclasses.dataclass(frozen=True)
class Option:
  name: str
  annotation: Any
  default: Any

  def describe(self) -> str:
    return f"{self.name}: {type_name(self.annotation)} = {self.default!r}"


def _parameters(fn: Callable, positional: tuple[str, ...]):
  """(name, annotation, default) of `fn`'s option parameters."""
  target = fn.__init__ if isinstance(fn, type) else fn
  hints = typing.get_type_hints(target)
  for name, p in inspect.signature(target).parameters.items():
    if name in positional or name in ("self", "rngs"):
      continue
    if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
      continue
    yield name, hints.get(name, p.annotation), p.default


def composed(fn: Callable, positional: tuple[str, ...]) -> dict[str, type]:
  """Parameters of `fn` whose annotation is an options dataclass."""
  return {name: ann for name, ann, _ in _parameters(fn, positional)
          if isinstance(ann, type) and dataclasses.is_dataclass(ann)}


def options_of(fn: Callable, positional: tuple[str, ...]) -> dict[str, Option]:
  """Options of `fn` (a function or class): its parameters other than
  `positional`, `self` and `rngs`, with the fields of an options dataclass
  in place of the parameter that takes it."""
  out = {}
  for name, ann, default in _parameters(fn, positional):
    if isinstance(ann, type) and dataclasses.is_dataclass(ann):
      hints = typing.get_type_hints(ann)
      fields = [Option(f.name, hints[f.name], f.default)
                for f in dataclasses.fields(ann)]
    else:
      fields = [Option(name, ann, default)]
    for option in fields:
      if option.name in out:
        raise TypeError(f"{fn.__name__}: option {option.name!r} is declared "
                        "twice (a parameter and an options dataclass field)")
      out[option.name] = option
  return out


class Registry(Generic[T]):
  """A name -> constructor map whose constructors take validated options.

  Args:
    kind: what the registry holds, for error messages ("sequence mixer").
    positional: names of the required positional arguments of every
      constructor (e.g. ("d_model",)); they are not options.
  """

  def __init__(self, kind: str, positional: tuple[str, ...] = (),
               load: Callable[[], None] | None = None):
    self.kind = kind
    self.positional = positional
    self._entries: dict[str, Callable[..., T]] = {}
    # Imports the modules that register entries, on first lookup, so that
    # importing a module beside the registry does not import them all.
    self._load = load

  def _loaded(self) -> dict[str, Callable[..., T]]:
    if self._load is not None:
      load, self._load = self._load, None
      load()
    return self._entries

  def register(self, name: str):
    def deco(ctor):
      if name in self._entries and self._entries[name] is not ctor:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = ctor
      ctor.registered_name = name
      return ctor
    return deco

  def names(self) -> list[str]:
    return list(self._loaded())

  def get(self, name: str) -> Callable[..., T]:
    if not isinstance(name, str):
      raise OptionError(
          f"{self.kind} name must be a string, got {type(name).__name__}")
    if name not in self._loaded():
      raise ValueError(
          f"unknown {self.kind} {name!r}.{_close(name, self._entries)} "
          f"Registered: {', '.join(sorted(self._entries))}.")
    return self._entries[name]

  def options(self, name: str) -> dict[str, Option]:
    return options_of(self.get(name), self.positional)

  def validate(self, name: str, options: dict[str, Any]) -> None:
    """Raise OptionError if `options` does not fit `name`'s constructor."""
    accepted = self.options(name)
    listing = "; ".join(o.describe() for o in accepted.values()) or "none"
    for key, value in options.items():
      if key not in accepted:
        raise OptionError(
            f"{self.kind} {name!r} has no option {key!r}."
            f"{_close(key, accepted)} Accepted options: {listing}.")
      ann = accepted[key].annotation
      if not check_type(value, ann):
        raise OptionError(
            f"{self.kind} {name!r} option {key!r} must be {type_name(ann)}, "
            f"got {value!r} ({type(value).__name__}).")
    ctor = self.get(name)
    try:
      self._grouped(ctor, options)  # runs the dataclasses' own checks
    except (TypeError, ValueError) as e:
      raise OptionError(f"{self.kind} {name!r}: {e}") from None
    check = getattr(ctor, "check_options", None)
    if check is not None:
      check(options)

  def _grouped(self, ctor, options: dict[str, Any]) -> dict[str, Any]:
    """`options` with the fields of each options dataclass gathered into
    an instance of it, under its parameter's name."""
    out = dict(options)
    for param, cls in composed(ctor, self.positional).items():
      fields = {f.name for f in dataclasses.fields(cls)}
      mine = {k: out.pop(k) for k in list(out) if k in fields}
      if mine:
        out[param] = cls(**mine)
    return out

  def build(self, name: str, *args, **options) -> T:
    self.validate(name, {k: v for k, v in options.items()
                         if k != "rngs" and k not in self.positional})
    return self.get(name)(*args, **self._grouped(self.get(name), options))
