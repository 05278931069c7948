"""General prose: the reStructuredText sources of the Python documentation, from Debian's `python3.11-doc` package
(installed by setup.sh; PSF License Agreement, examples Zero-Clause BSD — see the docs' license.rst.txt).

Passages are runs of prose paragraphs (code blocks, directives, tables and headings left out) of a few hundred to
~1,500 characters. Files are split train/eval by content hash. The FAQ is kept apart: its questions and answers are
the benign half of the safety domain; the changelogs (whatsnew) and the C API reference are left out.
"""
from __future__ import annotations

import functools
import glob
import os
import re

from bar_jax.errors import BarError
from bar_jax.data.sources import ScanReport, is_eval, read_text_files

LICENSE = "Python documentation (Debian python3.11-doc): PSF License Agreement; code examples Zero-Clause BSD"
_EXCLUDED = ("faq/", "whatsnew/", "c-api/", "includes/", "license", "copyright", "contents", "bugs", "about")
_HEADING_UNDERLINE = re.compile(r"^([=\-~^*#+\"'`])\1{3,}\s*$")


def docs_root() -> str:
  roots = sorted(glob.glob("/usr/share/doc/python3*/html/_sources"))
  if not roots:
    raise BarError("the Python documentation sources are missing (Debian package python3.11-doc): "
                   "run `bash setup.sh` (it apt-installs python3.11-doc)")
  return roots[-1]


@functools.lru_cache(maxsize=1)
def doc_files() -> tuple[tuple[tuple[str, str], ...], ScanReport]:
  root = docs_root()
  paths = sorted(glob.glob(os.path.join(root, "**", "*.rst.txt"), recursive=True))
  report = ScanReport()
  return tuple(read_text_files(paths, report, root)), report


def _is_prose(par: str) -> bool:
  first = par.lstrip("\n").split("\n", 1)[0]
  if not first or first[0].isspace() or first.startswith(("..", ":", "*", "-", "+", "|", "=", ">>>", "#")):
    return False
  if any(_HEADING_UNDERLINE.match(l) for l in par.splitlines()):
    return False
  letters = sum(c.isalpha() or c == " " for c in par)
  return len(par) >= 80 and letters / len(par) > 0.8


_ROLE = re.compile(r":[a-z:+-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def clean(par: str) -> str:
  """reST markup to plain text: roles to their text, ``literals`` and *emphasis* unwrapped, '::' to ':'."""
  par = _ROLE.sub(r"\1", re.sub(r"\s*\n\s*", " ", par.strip()))
  par = re.sub(r"``([^`]+)``", r"\1", par)
  par = re.sub(r"`([^`<]+?)(?:\s*<[^>]*>)?`_{0,2}", r"\1", par)
  par = re.sub(r"\*\*?([^*]+)\*\*?", r"\1", par)
  return re.sub(r"::$", ":", par)


def passages(text: str, max_chars: int = 1500) -> list[str]:
  """Consecutive prose paragraphs joined into passages of at most ~max_chars (one paragraph may exceed it)."""
  out, cur = [], []
  for par in re.split(r"\n\s*\n", text):
    par = par.strip("\n")
    if not _is_prose(par):
      if cur:
        out.append("\n\n".join(cur))
        cur = []
      continue
    par = clean(par)
    if cur and sum(len(p) for p in cur) + len(par) > max_chars:
      out.append("\n\n".join(cur))
      cur = []
    cur.append(par)
  if cur:
    out.append("\n\n".join(cur))
  return [p for p in out if len(p) >= 200]


@functools.lru_cache(maxsize=4)
def prose(which: str, eval_pct: int) -> tuple[str, ...]:
  """Passages from the files of one split (whole files decide the split: no passage straddles it)."""
  files, _ = doc_files()
  return tuple(p for path, text in files
               if not path.startswith(_EXCLUDED) and is_eval(text, eval_pct) == (which == "eval")
               for p in passages(text))


def _faq_answer(lines: list[str]) -> str:
  text = "\n".join(lines)
  pars = [clean(p) for p in re.split(r"\n\s*\n", text) if _is_prose(p.strip("\n"))]
  return "\n\n".join(pars[:2])


@functools.lru_cache(maxsize=1)
def faq() -> tuple[dict, ...]:
  """{question, answer} from the Python FAQ: a question heading and its first prose paragraphs."""
  files, _ = doc_files()
  out = []
  for path, text in files:
    if not path.startswith("faq/"):
      continue
    lines = text.splitlines()
    heads = [i for i in range(len(lines) - 1)
             if lines[i].strip().endswith("?") and _HEADING_UNDERLINE.match(lines[i + 1])
             and len(lines[i + 1].strip()) >= len(lines[i].strip())]
    for j, i in enumerate(heads):
      end = heads[j + 1] if j + 1 < len(heads) else len(lines)
      answer = _faq_answer(lines[i + 2:end])
      if answer:
        out.append({"question": lines[i].strip(), "answer": answer, "file": path})
  return tuple(out)
