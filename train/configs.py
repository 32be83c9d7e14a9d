"""Config files -> `train.config.Config`.

    cfg = load(["configs/tiny.yaml"], ["optimizer.lr=3e-4",
                                       "model.mixer=[mamba,mamba,attention]"])

A config file is YAML shaped like `Config` (sections model, data, optimizer,
train, mesh), holding only the keys it changes. Its optional `include:` (a
path or a list, relative to the file) names files merged before it. Each file
is merged once, at its first appearance, so a mixer file and a task file that
both include base.yaml can be stacked in either order without one resetting
the other. Files merge in order onto the dataclass defaults, then the dotted
command-line overrides (OmegaConf syntax: `key=value`, lists `[a,b]`, dicts
`{name: attention, num_heads: 2}`).

`load` returns a valid `Config` or raises `ConfigError`, whose message
starts with where the offending keys came from (a file path or
"command-line override"), then names the key, the value and what is
allowed. OmegaConf checks keys and types against the dataclasses
(structured configs; an unknown key gets the closest valid one); the
dataclasses check values when built (train/config.py); `load` also checks
that a text corpus path exists. A missing file or a YAML syntax error (with
the parser's line and column) is a ConfigError too.

A run directory's record of its config is `config.yaml` (`save`), written
by the trainer; `load` reads it back to an equal Config.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Iterable, Mapping, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from arches.validation import ConfigError
from layers.registry import type_name
from train import data
from train.config import Config

INCLUDE = "include"
FILENAME = "config.yaml"  # the run record: the resolved config in every run directory
OVERRIDE = "command-line override"
DEFAULT = "the defaults"


def _yaml_error(err: yaml.YAMLError, where: str) -> ConfigError:
  """One line with the parser's complaint and positions (1-based)."""
  def at(mark):
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
  problem = getattr(err, "problem", None) or str(err).splitlines()[0]
  context = getattr(err, "context", None)
  return ConfigError(f"{where}: YAML syntax error{at(getattr(err, 'problem_mark', None))}: "
                     f"{problem}" + (f" ({context}{at(err.context_mark)})" if context else ""))


def read_yaml(path: str, what: str = "config file") -> dict:
  """The mapping in a YAML file; ConfigError if it is missing, not YAML or
  not a mapping."""
  if not os.path.isfile(path):
    raise ConfigError(f"{what} {path!r} does not exist" if not os.path.exists(path)
                      else f"{what} {path!r} is not a file")
  try:
    content = OmegaConf.to_container(OmegaConf.load(path))
  except yaml.YAMLError as e:
    raise _yaml_error(e, path) from None
  if not isinstance(content, dict):
    raise ConfigError(f"{path}: a {what} must be a mapping of keys, got "
                      f"{type(content).__name__}")
  return content


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
    content = read_yaml(path)
    includes = content.pop(INCLUDE, [])
    for inc in [includes] if isinstance(includes, str) else includes:
      visit(os.path.join(os.path.dirname(path), inc))
    out.append((path, content))

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
    return ConfigError(f"{where}: {key}={err.value!r} must be "
                       f"{type_name(_field_type(key))}")
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
    if "=" not in o or not o.split("=", 1)[0]:
      raise ConfigError(f"override {o!r} must look like key=value, e.g. "
                        "optimizer.lr=3e-4")
    try:  # one at a time, so a syntax error names its override
      OmegaConf.from_dotlist([o])
    except yaml.YAMLError as e:
      raise _yaml_error(e, f"{OVERRIDE} {o!r}") from None
  return OmegaConf.from_dotlist(list(overrides))


def _set_keys(mapping: Mapping) -> list[str]:
  """The section.field keys a mapping sets (a field's value may be a
  mapping itself: a mixer spec, mesh.rules)."""
  keys = []
  for section, fields in mapping.items():
    keys += ([f"{section}.{f}" for f in fields] if isinstance(fields, Mapping)
             else [str(section)])
  return keys


def _compose(paths: Iterable[str], overrides: Sequence[str],
             first: Iterable[tuple[str, Mapping]]) -> tuple[DictConfig, dict[str, str]]:
  """(merged node, {section.field: where it was last set})."""
  node, sources = OmegaConf.structured(Config), {}
  for where, mapping in [*first, *file_chain(paths), (OVERRIDE, parse_overrides(overrides))]:
    node = merge(node, mapping, where)
    sources.update(dict.fromkeys(_set_keys(mapping), where))
  return node, sources


def compose(paths: Iterable[str] = (), overrides: Sequence[str] = (),
            first: Iterable[tuple[str, Mapping]] = ()) -> DictConfig:
  """The merged (still OmegaConf) config. `first`: (source, mapping) pairs
  merged before the files (a sweep's inline base)."""
  return _compose(paths, overrides, first)[0]


def to_config(node: DictConfig) -> Config:
  return OmegaConf.to_object(node)


def _located(err: ConfigError, sources: dict[str, str]) -> ConfigError:
  """`err` prefixed with where its keys were set."""
  if not err.keys:
    return err
  wheres = list(dict.fromkeys(sources.get(k, DEFAULT) for k in err.keys))
  if len(wheres) > 1:
    wheres = [f"{k} from {sources.get(k, DEFAULT)}" for k in err.keys]
  where = "; ".join(wheres)
  return ConfigError(f"{where}: {err}", *err.keys)


def load(paths: Iterable[str] | str = (), overrides: Sequence[str] = (),
         first: Iterable[tuple[str, Mapping]] = ()) -> Config:
  """The `Config` from config files, then dotted overrides; ConfigError (see
  the module doc) for anything invalid, including a text corpus path that
  does not exist."""
  paths = [paths] if isinstance(paths, str) else paths
  node, sources = _compose(paths, overrides, first)
  try:
    cfg = to_config(node)
    if cfg.data.task == "text":
      data.corpus_files(cfg.data.path)
  except ConfigError as e:
    raise _located(e, sources) from None
  except oc_errors.OmegaConfBaseException as e:  # e.g. an unresolvable ${...}
    key = e.full_key or ""
    where = sources.get(key, sources.get(key.split(".")[0], DEFAULT))
    raise ConfigError(f"{where}: {key}: {str(e).splitlines()[0]}", key) from None
  return cfg


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
  """Write the fully resolved config to run_dir/config.yaml (atomically: a
  kill leaves the old record or the new one); return the path. `load(path)`
  gives back an equal Config."""
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, FILENAME)
  with open(path + ".tmp", "w") as f:
    f.write(dumps(cfg))
  os.replace(path + ".tmp", path)
  return path


def replace(cfg: Config, **sections) -> Config:
  """`cfg` with fields of sections replaced: replace(cfg, train={"run_dir": d})."""
  return dataclasses.replace(cfg, **{
      name: dataclasses.replace(getattr(cfg, name), **fields)
      for name, fields in sections.items()})
