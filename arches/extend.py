"""Context extension at test time: a RoPE-trained model's config with its
rotary embedding rescaled, for evaluating at `factor` times the training
length without retraining.

    cfg2 = extend_rope(cfg, "yarn", factor=4, train_len=512)
    model2 = nnx.merge(graphdef_of(cfg2), params_trained_under_cfg)

Position schemes hold no parameters, so the trained weights load into the
rescaled model unchanged; only the rotation angles (and YaRN's attention
temperature) differ. At factor 1 every extension is plain RoPE. The schemes
are Chen et al. 2023 (position interpolation, `rope_linear`), NTK-aware
scaling (`rope_ntk`) and Peng et al. 2023 (`yarn`, original length =
train_len), all in `layers.positions`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from arches.lm import LMConfig, thaw
from arches.validation import ConfigError
from layers import mixers

EXTENSIONS = ("rope_linear", "rope_ntk", "yarn")


def _rope_base(name: str, options: Mapping) -> float | None:
  """The base of a mixer spec's position if it is plain full RoPE (the
  extensions rescale every channel), else None."""
  accepted = mixers.REGISTRY.options(name)
  if "position" not in accepted:
    return None
  spec = options.get("position", accepted["position"].default)
  spec = {"name": spec} if isinstance(spec, str) else dict(spec)
  if spec.pop("name") != "rope" or spec.pop("fraction", 1.0) != 1.0:
    return None
  return spec.pop("base", 10000.0)


def extend_rope(cfg: LMConfig, scheme: str, factor: float, train_len: int) -> LMConfig:
  """`cfg` with every mixer layer whose position is plain RoPE switched to
  `scheme` (one of EXTENSIONS) at context-extension `factor` (>= 1), same
  base; other layers unchanged. ConfigError when the model has no such
  layer or the scheme is unknown."""
  if scheme not in EXTENSIONS:
    raise ConfigError(f"test-time position {scheme!r} is not a RoPE extension; "
                      f"allowed: {', '.join(EXTENSIONS)}", "train.eval_positions")
  pattern = cfg.mixer if isinstance(cfg.mixer, tuple) else (cfg.mixer,)
  out, changed = [], 0
  for spec in pattern:
    name, options = ((spec, {}) if isinstance(spec, str)
                     else (spec["name"], thaw({k: v for k, v in spec.items() if k != "name"})))
    base = _rope_base(name, options)
    if base is None:
      out.append(thaw(spec))
      continue
    position = {"name": scheme, "base": base, "factor": float(factor)}
    if scheme == "yarn":
      position["original_max_len"] = train_len
    out.append({"name": name, **options, "position": position})
    changed += 1
  if not changed:
    raise ConfigError(
        f"test-time position {scheme!r} rescales RoPE, but no layer of "
        f"model.mixer={thaw(cfg.mixer)!r} uses plain RoPE (position 'rope', "
        "fraction 1)", "train.eval_positions", "model.mixer")
  return dataclasses.replace(cfg, mixer=out if isinstance(cfg.mixer, tuple) else out[0])
