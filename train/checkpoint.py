"""Checkpoints of the train state and the data position, with orbax.

Each checkpoint is a step directory holding two items: "state" (the
`TrainState` arrays, restored straight into their shardings) and "data"
(the data iterator's JSON state). Orbax writes a step into a temporary
directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint as the latest one; leftover temporaries are removed when
the manager opens the directory again.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from train.state import TrainState


class Checkpointer:
  """Save every N steps (async), keep the last K, restore the latest."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True,
               read_only: bool = False):
    """read_only: for readers of a run that may still be writing (it must
    not delete the writer's in-progress temporaries)."""
    if keep < 1:
      raise ValueError(f"TrainConfig.keep_checkpoints must be >= 1, got {keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory),
                                         item_names=("state", "data"),
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

  def wait(self):
    """Block until every started save is complete on disk."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
