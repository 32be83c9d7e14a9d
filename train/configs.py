"""Config files -> `train.config.Config`.

    cfg = load(["configs/mixers/mamba.yaml"], ["optimizer.lr=3e-4",
                                                "model.mixer=[mamba,mamba,attention]"])

A config file is YAML shaped like `Config` (sections model, data, optimizer,
train, mesh), holding only the keys it changes. Its optional `include:` (a
path or a list, relative to the file) names files merged before it. Each file
is merged once, at its first appearance, so a mixer file and a task file that
both include base.yaml can be stacked in either order without one resetting
the other. Files merge in order onto the dataclass defaults, then the dotted
command-line overrides (OmegaConf syntax: `key=value`, lists `[a,b]`, dicts
`{name: attention, num_heads: 2}`).

OmegaConf checks keys and types against the dataclasses (structured
configs); its errors are re-raised as `ConfigError` naming the key, where it
came from and the closest valid key. Mixer options are checked by the mixer
registry when `LMConfig` is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Iterable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from layers.registry import type_name
from train.config import Config

INCLUDE = "include"
FILENAME = "config.yaml"  # the resolved config in every run directory


class ConfigError(ValueError):
  """A config file or override names an unknown key or has a wrong type."""


def file_chain(paths: Iterable[str]) -> list[tuple[str, dict]]:
  """(path, contents without `include`) for `paths` and everything they
  include, depth first, each file once."""
  seen: set[str] = set()
  out: list[tuple[str, dict]] = []

  def visit(path: str):
    path = os.path.normpath(path)
    if path in seen:
      return
    seen.add(path)
    if not os.path.isfile(path):
      raise ConfigError(f"config file {path!r} does not exist")
    data = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(data, dict):
      raise ConfigError(f"{path}: a config file must be a mapping of sections, "
                        f"got {type(data).__name__}")
    includes = data.pop(INCLUDE, [])
    for inc in [includes] if isinstance(includes, str) else includes:
      visit(os.path.join(os.path.dirname(path), inc))
    out.append((path, data))

  for p in paths:
    visit(p)
  return out


def _explain(err: oc_errors.OmegaConfBaseException, where: str) -> ConfigError:
  """A ConfigError naming the key, its source and the closest valid key."""
  key = err.full_key or ""
  parent_path, _, leaf = key.rpartition(".")
  schema = OmegaConf.structured(Config)
  parent = OmegaConf.select(schema, parent_path) if parent_path else schema
  if isinstance(err, oc_errors.ConfigKeyError) and isinstance(parent, DictConfig):
    valid = list(parent.keys())
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.4)
    hint = f" Did you mean {(parent_path + '.' if parent_path else '') + close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}.{hint} Valid keys"
                       f"{' in ' + parent_path if parent_path else ''}: "
                       f"{', '.join(valid)}.")
  if key:
    return ConfigError(f"{where}: {key} must be {type_name(_field_type(key))}, "
                       f"got {err.value!r}")
  return ConfigError(f"{where}: {str(err).splitlines()[0]}")


def _field_type(full_key: str):
  """The annotation of a dotted key in the Config dataclasses."""
  ann = Config
  for part in full_key.split("."):
    ann = typing.get_type_hints(ann)[part]
  return ann


def merge(base: DictConfig, update, where: str) -> DictConfig:
  try:
    return OmegaConf.merge(base, update)
  except oc_errors.OmegaConfBaseException as e:
    raise _explain(e, where) from None


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
  for o in overrides:
    if "=" not in o:
      raise ConfigError(f"override {o!r} must look like key=value, e.g. "
                        "optimizer.lr=3e-4")
  return OmegaConf.from_dotlist(list(overrides))


def compose(paths: Iterable[str] = (), overrides: Sequence[str] = (),
            first: Iterable[tuple[str, Mapping]] = ()) -> DictConfig:
  """The merged (still OmegaConf) config. `first`: (source, mapping) pairs
  merged before the files (a sweep's inline base)."""
  node = OmegaConf.structured(Config)
  for where, data in [*first, *file_chain(paths)]:
    node = merge(node, data, where)
  return merge(node, parse_overrides(overrides), "command-line override")


def to_config(node: DictConfig) -> Config:
  return OmegaConf.to_object(node)


def load(paths: Iterable[str] | str = (), overrides: Sequence[str] = (),
         first: Iterable[tuple[str, Mapping]] = ()) -> Config:
  """The `Config` from config files, then dotted overrides."""
  paths = [paths] if isinstance(paths, str) else paths
  return to_config(compose(paths, overrides, first))


def to_dict(cfg: Config) -> dict:
  """Plain nested dict of a Config (lists and dicts, YAML-ready)."""
  out = {}
  for f in dataclasses.fields(cfg):
    section = getattr(cfg, f.name)
    out[f.name] = (section.to_dict() if hasattr(section, "to_dict")
                   else dataclasses.asdict(section))
  return out


def dumps(cfg: Config) -> str:
  return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def save(cfg: Config, run_dir: str) -> str:
  """Write the fully resolved config to run_dir/config.yaml; return the path.
  `load(path)` gives back an equal Config."""
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, FILENAME)
  with open(path, "w") as f:
    f.write(dumps(cfg))
  return path


def replace(cfg: Config, **sections) -> Config:
  """`cfg` with fields of sections replaced: replace(cfg, train={"run_dir": d})."""
  return dataclasses.replace(cfg, **{
      name: dataclasses.replace(getattr(cfg, name), **fields)
      for name, fields in sections.items()})
