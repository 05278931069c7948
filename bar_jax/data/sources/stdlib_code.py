"""Code: the Python standard library's own source on disk (PSF License), parsed with `ast`.

Files are split train/eval by the hash of their content, so a held-out function body never appears in any training
text. Mid-training reads whole files; SFT pairs are (signature + docstring) -> body of documented functions.
Empty files (many `__init__.py`) are counted and skipped; non-UTF-8 files are counted and skipped.
"""
from __future__ import annotations

import ast
import functools
import os
import sysconfig

from bar_jax.data.sources import ScanReport, is_eval, normalised, read_text_files

LICENSE = "Python standard library source: PSF License Agreement"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip"}


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=2)
def files(max_files: int = 0) -> tuple[tuple[tuple[str, str], ...], ScanReport]:
  """((relative path, source), ...) sorted by path, at most max_files (0 = all), and what was skipped."""
  root = stdlib_root()
  paths = []
  for d, dirs, names in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
    paths += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
  paths.sort()
  if max_files:
    paths = paths[:max_files]
  report = ScanReport()
  return tuple(read_text_files(paths, report, root)), report


def split_files(which: str, eval_pct: int, max_files: int = 0) -> list[tuple[str, str]]:
  return [(p, t) for p, t in files(max_files)[0] if is_eval(t, eval_pct) == (which == "eval")]


def _functions_with_qualnames(tree: ast.AST) -> list[tuple[ast.AST, str]]:
  """(function node, qualified name as Python spells __qualname__: Class.method, outer.<locals>.inner) in ast.walk's
  breadth-first order."""
  names: dict[int, str] = {}
  stack = [(tree, "")]
  while stack:
    node, prefix = stack.pop()
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        qual = f"{prefix}{child.name}"
        names[id(child)] = qual
        inner = f"{qual}.<locals>." if not isinstance(child, ast.ClassDef) else f"{qual}."
        stack.append((child, inner))
      else:
        stack.append((child, prefix))
  return [(n, names[id(n)]) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def functions_in(path: str, source: str, *, min_body_lines: int = 2, max_body_lines: int = 30) -> list[dict]:
  """Documented functions of one file: {name, file, header (decorators + signature + docstring), body}, dedented.

  name is `path:qualname:line` (the line of the `def`), unique within a file: a bare `path:name` repeats for
  methods of one name in several classes and for redefinitions (a property's getter and setter, a platform's two
  versions of one function). file is the path, the cluster a bootstrap resamples by."""
  try:
    tree = ast.parse(source)
  except SyntaxError:
    return []  # a few stdlib files target other Python versions; their text still trains the LM
  lines = source.splitlines(keepends=True)
  out = []
  for node, qualname in _functions_with_qualnames(tree):
    doc = node.body[0] if node.body else None
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
      continue
    if len(node.body) < 2 or len(doc.value.value.strip()) < 20:
      continue
    start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
    header = "".join(lines[start:doc.end_lineno])
    body = "".join(lines[doc.end_lineno:node.end_lineno])
    n_body = sum(1 for l in body.splitlines() if l.strip())
    if not min_body_lines <= n_body <= max_body_lines:
      continue
    indent = len(lines[start]) - len(lines[start].lstrip())
    code_lines = [_unindent(l, indent) for l in lines[start:node.end_lineno]]
    n_header = doc.end_lineno - start
    out.append({"name": f"{path}:{qualname}:{node.lineno}", "file": path, "header": "".join(code_lines[:n_header]),
                "body": "".join(code_lines[n_header:]), "source": header + body})
  return out


def _unindent(line: str, n: int) -> str:
  """Strips up to n leading spaces (a comment at column 0 inside a method stays as it is)."""
  k = len(line) - len(line.lstrip(" "))
  return line[min(k, n):]


@functools.lru_cache(maxsize=4)
def functions(which: str, eval_pct: int, max_files: int = 0) -> tuple[dict, ...]:
  """Functions of one split's files. Held-out ones whose source also occurs in a training file (the stdlib has a
  few copied functions) are left out, so no held-out body is ever trained on."""
  found = [f for path, src in split_files(which, eval_pct, max_files) for f in functions_in(path, src)]
  if which == "eval":  # also no held-out function equal to a training one after normalisation (spacing, comments' case)
    train_text = "\n".join(t for _, t in split_files("train", eval_pct, max_files))
    train_functions = {normalised(f["header"] + "\n" + f["body"]) for f in functions("train", eval_pct, max_files)}
    found = [f for f in found if f["source"] not in train_text
             and normalised(f["header"] + "\n" + f["body"]) not in train_functions]
  return tuple(found)
