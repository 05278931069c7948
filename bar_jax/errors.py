"""User-facing errors: one line that names the problem and the fix. The CLI prints it and exits 2, no traceback.

Operating-system failures (full disk, read-only or missing paths) reach the CLI from deep inside orbax, tensorstore
or grain, often re-raised as another type or only as text; `os_failure` finds them so they print as one line too.
"""
from __future__ import annotations

import errno
import os
import sys


class BarError(Exception):
  """Bad input (config, artifact, data, prompt). Message: what is wrong, then what to do about it."""


# The exit status of a run stopped by SIGTERM (a preempted pod slice, a SLURM job at its limit) after it saved a
# checkpoint at a step boundary: EX_TEMPFAIL of sysexits.h, "try again", which resumes.
PREEMPTED_EXIT = 75


class Preempted(Exception):
  """Training stopped on SIGTERM with a checkpoint written; the CLI prints the message and exits PREEMPTED_EXIT."""


# errno -> what to do about it (the strerror text is matched too: tensorstore reports these as text).
_OS_FIXES = {
    errno.ENOSPC: "free disk space (or choose a --workdir on a larger disk) and run the same command again: it "
                  "resumes from the last checkpoint",
    errno.EDQUOT: "free space within your disk quota and run the same command again: it resumes",
    errno.EROFS: "the file system is read-only: choose a writable --workdir",
    errno.EACCES: "make the path readable/writable for this user, or choose another --workdir",
    errno.EPERM: "make the path readable/writable for this user, or choose another --workdir",
    errno.ENOENT: "check the path (a file the run needs is missing)",
    errno.ENOTDIR: "a path that must be a directory is a file: choose another --workdir",
    errno.EISDIR: "a path that must be a file is a directory: check the path",
}


def os_failure(e: BaseException) -> str | None:
  """One line for an operating-system failure anywhere in e's chain (cause/context), or None if there is none."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _OS_FIXES:
      where = f" at {e.filename}" if e.filename else ""
      return f"{os.strerror(e.errno)}{where}; {_OS_FIXES[e.errno]}"
    text = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # reported as text by tensorstore/orbax
      if os.strerror(code) in text:
        return f"{os.strerror(code)} ({type(e).__name__} while writing); {_OS_FIXES[code]}"
    e = e.__cause__ or e.__context__
  return None


def run_main(main) -> None:
  """Runs a script's main() as the CLI does: a BarError (or an operating-system failure) prints one line and exits
  2; a run stopped by SIGTERM (Preempted) prints its one line and exits PREEMPTED_EXIT."""
  try:
    main()
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    raise SystemExit(PREEMPTED_EXIT) from None
  except BarError as e:
    raise SystemExit(f"error: {e}") from None
  except OSError as e:
    line = os_failure(e)
    if line is None:
      raise
    raise SystemExit(f"error: {line}") from None
