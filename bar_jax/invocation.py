"""The command line this process was started with (set by the CLI), recorded in every manifest and results file it
writes, so a result names exactly what made it: the config, the workdir and every override. None when a program
calls the stages directly (experiments, tests): they record their own command."""
from __future__ import annotations

import shlex

_COMMAND: str | None = None


def record(argv: list[str]) -> None:
  global _COMMAND
  _COMMAND = shlex.join(argv)


def command() -> str | None:
  return _COMMAND
