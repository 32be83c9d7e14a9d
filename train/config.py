"""Typed experiment configuration: frozen dataclasses, one per concern.

`Config` is what the trainer, the CLI, sweeps and notebooks pass around.
The model section is `arches.lm.LMConfig` itself, so a model built from a
config file and one built in a notebook are the same object.

Each dataclass checks its fields when it is built (types, ranges,
enumerations, rules across its own fields) and `Config` checks the rules
across sections, so a `Config` that exists is valid. A bad value raises
`ConfigError` naming the key (section.field), the value and what is
allowed. What depends on the machine (mesh sizes and batch splits vs the
device count) is checked where the mesh is built, before any training work.
"""

from __future__ import annotations

import dataclasses

from arches.extend import EXTENSIONS, extend_rope
from arches.lm import LMConfig
from arches.validation import (NON_EMPTY, ConfigError, Rule, above, at_least,
                               check_fields, each, one_of, within)
from train import data
from train.trainer import optim, sharding


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """See train/data/__init__.py. `seed` fixes the text train/validation split and the
  validation set; the training order comes from the trainer's seed."""
  task: str = "text"          # "text" | "mqar" | "selective_copy" | "induction"
  path: str = ""              # text: file, folder or glob; "" = the embedded corpus
  seq_len: int = 128
  val_fraction: float = 0.05  # text: fraction of documents held out
  pack: bool = False          # pack documents with segment ids (text)
  seed: int = 0
  prefetch: int = 2           # batches prepared ahead by a background thread; 0 = none
  # synthetic tasks
  num_kv_pairs: int = 8       # mqar
  mqar_power_a: float = 0.01  # mqar query-gap power law (Zoology's power_a)
  mqar_random_non_queries: bool = False  # mqar fill: random tokens, not 0 (Zoology's flag)
  copy_tokens: int = 16       # selective_copy: tokens to copy
  vocab_size: int = 256       # synthetic tasks; text is bytes (256)

  def __post_init__(self):
    data.check_config(self)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adamw"         # "adamw" | "lion"
  lr: float = 3e-3
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  decay_embeddings: bool = False
  schedule: str = "cosine"    # "cosine" | "linear" | "constant"
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  clip_norm: float = 1.0       # global-norm clipping; 0 turns it off
  eps: float = 1e-8           # AdamW only

  def __post_init__(self):
    unit = within(0, 1, open_hi=True)
    check_fields(self, "optimizer", name=one_of(optim.OPTIMIZERS), lr=above(0),
                 b1=unit, b2=unit, weight_decay=at_least(0),
                 schedule=one_of(optim.DECAYS), warmup_steps=at_least(0),
                 min_lr_ratio=within(0, 1), clip_norm=at_least(0), eps=above(0))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Intervals count steps; one longer than `steps` never fires (the last
  step always logs, evaluates and checkpoints)."""
  steps: int = 200
  batch_size: int = 16
  grad_accum: int = 1
  eval_every: int = 100
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  run_dir: str = "runs/default"
  seed: int = 0
  eval_lengths: tuple[int, ...] = ()  # final eval at these multiples of seq_len
  # ... and again with RoPE rescaled at test time (arches.extend), factor = multiple
  eval_positions: tuple[str, ...] = ()
  async_checkpoint: bool = True

  def __post_init__(self):
    check_fields(self, "train", steps=at_least(1), batch_size=at_least(1),
                 grad_accum=at_least(1), eval_every=at_least(1),
                 eval_batches=at_least(1), log_every=at_least(1),
                 checkpoint_every=at_least(1), keep_checkpoints=at_least(1),
                 run_dir=NON_EMPTY, seed=at_least(0), eval_lengths=each(at_least(1)),
                 eval_positions=each(one_of(EXTENSIONS)))
    if self.eval_positions and not self.eval_lengths:
      raise ConfigError(f"train.eval_positions={list(self.eval_positions)} rescales RoPE "
                        "at the train.eval_lengths, which are empty; give both",
                        "train.eval_positions", "train.eval_lengths")
    if self.batch_size % self.grad_accum:
      raise ConfigError(f"train.batch_size={self.batch_size} must be divisible by "
                        f"train.grad_accum={self.grad_accum} (equal micro-batches)",
                        "train.batch_size", "train.grad_accum")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (see train/trainer/sharding.py); their product must be
  the device count."""
  data: int = -1              # -1: all devices not used by other axes
  fsdp: int = 1
  expert: int = 1             # expert parallelism: MoE experts split over it
  sequence: int = 1           # context parallelism: each row's length split over it
  tensor: int = 1             # tensor parallelism: heads and hidden units split over it
  # logical axis name -> mesh axis; unnamed axes are replicated
  rules: dict = dataclasses.field(default_factory=lambda: dict(sharding.DEFAULT_RULES))

  def __post_init__(self):
    check_fields(self, "mesh", fsdp=at_least(1), expert=at_least(1),
                 sequence=at_least(1), tensor=at_least(1), data=Rule(
        lambda v: v == -1 or v >= 1, "-1 (every device the other axes leave) or >= 1"))
    sharding.check_rules(self.rules)


@dataclasses.dataclass(frozen=True)
class Config:
  model: LMConfig = dataclasses.field(default_factory=LMConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  def __post_init__(self):
    data.check_compatible(self.data, self.model)
    for scheme in self.train.eval_positions:  # the model must have RoPE layers
      extend_rope(self.model, scheme, 2.0, self.data.seq_len)
    sharding.check_expert_parallel(self.model, self.mesh.expert)
    sharding.check_parallel(self.model, self.mesh, self.data.seq_len)
