"""Resumable training state with orbax: trainable params, optimiser state, step, and the data iterator's position.

Frozen parameters are not saved: they are the input artifact's, which the stage identity pins by fingerprint
(identity.json beside the checkpoints; bar_jax/io/workdir.py refuses a folder of another run).

Every saved step is sealed with the sha256 of each of its files (STEP/bar_checksums.json, written once orbax has
finished the step). A resume verifies the step it restores: a damaged one is refused with one line, or, when asked
(Checkpointer(fallback=True): a stage config's `checkpoint_fallback`, set by the CLI's `--checkpoint_fallback`),
moved aside to checkpoints.damaged/ and the previous good step restored instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from bar_jax.errors import BarError


def _is_grain_iterator(it) -> bool:
  import grain
  return isinstance(it, grain.DatasetIterator)


CHECKSUMS = "bar_checksums.json"


def file_digests(directory: str) -> dict[str, str]:
  """{relative path: sha256} of every file under directory except the checksum file itself."""
  out = {}
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel.startswith(CHECKSUMS):  # the seal and its temporary file
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
      out[rel] = h.hexdigest()
  return out


def damage(directory: str) -> str | None:
  """None if directory matches its checksums (or has none yet: a kill between orbax's commit and the seal);
  otherwise what differs, e.g. 'state/d/53b6 changed'."""
  path = os.path.join(directory, CHECKSUMS)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      expected = json.load(f)
  except (OSError, ValueError):
    return f"{CHECKSUMS} unreadable"
  actual = file_digests(directory)
  for rel in sorted(set(expected) | set(actual)):
    if expected.get(rel) != actual.get(rel):
      return f"{rel} {'missing' if rel not in actual else 'unexpected' if rel not in expected else 'changed'}"
  return None


def check_disk_room(directory: str, nbytes: int, what: str) -> None:
  """BarError before a write that cannot fit: orbax fails a full disk from many worker threads (500+ lines)."""
  existing = directory
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  free = shutil.disk_usage(existing).free
  need = int(nbytes * 1.1) + 2**20  # + metadata and slack
  if free < need:
    raise BarError(f"no room for {what}: it needs ~{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free under "
                   f"{existing}; free disk space and run the same command again (it resumes from the last "
                   "checkpoint)")


class Checkpointer:
  """orbax CheckpointManager over {state: pytree, data: iterator state}; keeps the last `max_to_keep`."""

  def __init__(self, directory: str, max_to_keep: int = 2, fallback: bool = False):
    self.directory = os.path.abspath(directory)
    self.max_to_keep = max_to_keep
    self.fallback = fallback  # a damaged latest step: moved aside and the previous one used, instead of refused
    self._verified: set[int] = set()
    self.manager = self._open()

  def _open(self):
    return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True))

  def latest_step(self) -> int | None:
    """The newest step that passes its checksums; a damaged one is refused (BarError) or, with fallback, moved to
    checkpoints.damaged/ and the previous step tried."""
    while True:
      step = self.manager.latest_step()
      if step is None or step in self._verified:
        return step
      what = damage(os.path.join(self.directory, str(step)))
      if what is None:
        self._verified.add(step)
        return step
      earlier = [s for s in self.manager.all_steps() if s < step]
      if not self.fallback:
        raise BarError(f"checkpoint {self.directory}/{step} is damaged ({what} since it was written); re-run with "
                       f"--checkpoint_fallback to resume from the previous good step "
                       f"({max(earlier) if earlier else 'none: start over'}), or use a fresh --workdir")
      aside = os.path.join(self.directory + ".damaged", str(step))
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      shutil.rmtree(aside, ignore_errors=True)
      self.manager.close()
      os.replace(os.path.join(self.directory, str(step)), aside)
      print(f"[checkpoint] {self.directory}/{step} is damaged ({what}); moved to {aside}, resuming from "
            f"{max(earlier) if earlier else 'the start'}", flush=True)
      self.manager = self._open()

  def save(self, step: int, state: Any, data_iter=None) -> None:
    check_disk_room(self.directory, sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)),
                    f"checkpoint step {step}")
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      import grain
      items["data"] = (grain.checkpoint.CheckpointSave(data_iter) if _is_grain_iterator(data_iter)
                       else ocp.args.JsonSave(data_iter.get_state()))
    self.manager.save(step, args=ocp.args.Composite(**items))
    self.seal(step)

  def seal(self, step: int) -> None:
    """Waits for the step to be committed, then records its files' checksums (process 0; atomically)."""
    self.manager.wait_until_finished()
    step_dir = os.path.join(self.directory, str(step))
    if jax.process_index() != 0 or not os.path.isdir(step_dir):
      return
    digests = file_digests(step_dir)
    tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
    with open(tmp, "w") as f:
      json.dump(digests, f, indent=0, sort_keys=True)
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS))
    self._verified.add(step)

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

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
