"""Typed experiment configuration: frozen dataclasses, one per concern.

`Config` is what the trainer, the CLI, sweeps and notebooks pass around.
The model section is `arches.lm.LMConfig` itself, so a model built from a
config file and one built in a notebook are the same object.
"""

from __future__ import annotations

import dataclasses

from arches.lm import LMConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """See train/data.py. `seed` fixes the text train/validation split and the
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
  copy_tokens: int = 16       # selective_copy: tokens to copy
  vocab_size: int = 256       # synthetic tasks; text is bytes (256)


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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
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
  async_checkpoint: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1              # -1: all devices not used by other axes
  fsdp: int = 1
  expert: int = 1             # expert parallelism: MoE experts split over it
  # logical axis name -> mesh axis; unnamed axes are replicated
  rules: dict = dataclasses.field(
      default_factory=lambda: {"embed": "fsdp", "experts": "expert"})


@dataclasses.dataclass(frozen=True)
class Config:
  model: LMConfig = dataclasses.field(default_factory=LMConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
