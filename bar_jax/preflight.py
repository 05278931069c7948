"""Checks of the operating system before a run does any work: the workdir is a writable directory on a disk with room.

Each check is a handful of system calls (seconds at most, never a wait on a lock), so a run that cannot write its
result stops with one line before it reads a single parameter (a merge into a read-only folder used to hang inside
orbax for minutes).
"""
from __future__ import annotations

import os
import shutil
import tempfile

from bar_jax.errors import BarError

MIN_FREE_MB = 256  # below this even a tiny run's checkpoints and manifest fail half-written


def check_workdir(workdir: str, min_free_mb: float = MIN_FREE_MB) -> str:
  """The absolute workdir; BarError unless it (or, if it does not exist yet, its nearest existing parent, where it
  will be created) is a writable directory with min_free_mb free. Creates nothing: a refused run leaves no trace."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise BarError(f"--workdir {path} is a file, not a directory; pass a directory (it is created if missing)")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise BarError(f"--workdir {path} cannot be created: {existing} is a file; choose another --workdir")
  try:  # os.access trusts permission bits only: a read-only mount or a full disk shows up in a real write
    fd, probe = tempfile.mkstemp(prefix=".bar_write_probe-", dir=existing)
    try:
      os.write(fd, b"x")
    finally:
      os.close(fd)
      os.remove(probe)
  except OSError as e:
    what = "is not writable" if existing == path else f"cannot be created ({existing} is not writable)"
    raise BarError(f"--workdir {path} {what}: {e.strerror}; choose a writable directory") from None
  free_mb = shutil.disk_usage(existing).free / 2**20
  if free_mb < min_free_mb:
    raise BarError(f"only {free_mb:.0f} MiB free on the disk of --workdir {path} (need at least {min_free_mb:g} "
                   f"MiB); free space or choose another --workdir (--min_free_mb sets the threshold)")
  return path
