"""Resumable training state with orbax: trainable params, optimiser state, step, and the data iterator's position.

Frozen parameters are not saved: they are the input artifact's, which the stage identity pins by fingerprint
(identity.json beside the checkpoints; bar_jax/io/workdir.py refuses a folder of another run).
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from bar_jax.errors import BarError


def _is_grain_iterator(it) -> bool:
  import grain
  return isinstance(it, grain.DatasetIterator)


class Checkpointer:
  """orbax CheckpointManager over {state: pytree, data: iterator state}; keeps the last `max_to_keep`."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      import grain
      items["data"] = (grain.checkpoint.CheckpointSave(data_iter) if _is_grain_iterator(data_iter)
                       else ocp.args.JsonSave(data_iter.get_state()))
    self.manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, step: int, abstract_state: Any, data_iter=None) -> Any:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      import grain
      items["data"] = (grain.checkpoint.CheckpointRestore(data_iter) if _is_grain_iterator(data_iter)
                       else ocp.args.JsonRestore())
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for torn or foreign files
      raise BarError(f"checkpoint {self.directory}/{step} cannot be restored ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]}); delete that step's folder to resume from an earlier one, "
                     f"or use a fresh --workdir") from None
    if data_iter is not None and not _is_grain_iterator(data_iter):
      data_iter.set_state(out["data"])
    return out["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
