"""Checkpoints of the train state and the data position, with orbax.

Each checkpoint is a step directory holding two items: "state" (the
`TrainState` arrays, restored straight into their shardings) and "data"
(the data iterator's JSON state). Orbax writes a step into a temporary
directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint as the latest one; temporaries are never taken for
steps, and leftover ones are removed when a writer opens the directory.

A step that was completed but later damaged (a truncated or deleted file,
bad metadata) is skipped by `restore_latest` with a warning naming the step
and the error: the previous step is restored instead, and the damaged one
is moved to <run_dir>/damaged_checkpoints/ so that training can write that
step again.
"""

from __future__ import annotations

import logging
import os
import time

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from arches.validation import ConfigError
from train.trainer.state import TrainState

logger = logging.getLogger("mixerlab.checkpoint")
DAMAGED = "damaged_checkpoints"  # beside the checkpoints directory


class Checkpointer:
  """Save every N steps (async), keep the last K, restore the latest."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True,
               read_only: bool = False):
    """read_only: for readers of a run that may still be writing (it must
    not delete the writer's in-progress temporaries, nor move steps)."""
    if keep < 1:
      raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
    self.directory, self.read_only = os.path.abspath(directory), read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict):
    """Starts the save and returns; the arrays are copied off the device
    first, so the caller may donate `state` to the next step at once."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        force=True)

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
    """(state, data_state) of `step`; `abstract_state` holds ShapeDtypeStructs
    with the shardings to restore into."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, out.data

  def restore_latest(self, abstract_state: TrainState
                     ) -> tuple[tuple[int, TrainState, dict] | None, dict[int, str]]:
    """((step, state, data_state) of the newest readable step, or None when
    there are no checkpoints; {step: error} of the newer steps skipped as
    unreadable). ConfigError when there are steps but none can be read
    (nothing is moved then: the cause may be the code, not the files)."""
    skipped: dict[int, str] = {}
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # orbax and tensorstore raise many types for bad files
        skipped[step] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        logger.warning("checkpoint step %d in %s cannot be read (%s); trying the "
                       "previous one", step, self.directory, skipped[step])
        continue
      if skipped and not self.read_only:
        self._set_aside(skipped)
      return (step, state, data_state), skipped
    if skipped:
      raise ConfigError(
          f"no checkpoint in {self.directory} can be read: "
          + "; ".join(f"step {s}: {err}" for s, err in skipped.items())
          + ". Move the directory away to start afresh.", "train.run_dir")
    return None, skipped

  def _set_aside(self, steps):
    """Move damaged steps out of orbax's sight, so a new save of the same
    step does not collide with them and keep-last-K does not count them."""
    if jax.process_index() == 0:
      target = os.path.join(os.path.dirname(self.directory), DAMAGED)
      os.makedirs(target, exist_ok=True)
      stamp = time.strftime("%Y%m%dT%H%M%S")
      for step in steps:
        dest = os.path.join(target, f"{step}.{stamp}")
        os.replace(os.path.join(self.directory, str(step)), dest)
        logger.warning("moved unreadable checkpoint step %d to %s", step, dest)
    if jax.process_count() > 1:  # every process reloads after the move
      multihost_utils.sync_global_devices("mixerlab: damaged checkpoints set aside")
    self.manager.reload()

  def wait(self):
    """Block until every started save is complete on disk."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
