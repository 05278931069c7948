"""Resumable training state with orbax: trainable params, optimiser state, step, and the data iterator's position.

Frozen parameters are not saved: they are the input artifact's, which the run identity (run.json) pins by fingerprint.
A workdir whose run.json describes another run is refused before anything is written.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from bar_jax.errors import BarError


def check_run_identity(workdir: str, identity: dict[str, Any]) -> None:
  """First call writes workdir/run.json; later calls (resumes) must describe the same run."""
  path = os.path.join(workdir, "run.json")
  identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
  if os.path.exists(path):
    with open(path) as f:
      try:
        previous = json.load(f)
      except json.JSONDecodeError:
        raise BarError(f"{path} is corrupt; delete it (and {workdir}/checkpoints) or use a fresh --workdir") from None
    if previous != identity:
      keys = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
      raise BarError(f"workdir {workdir} holds a checkpoint of another run (differs in {keys}); "
                     f"use a fresh --workdir or the original config")
    return
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(identity, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


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
