"""Nested parameter dicts <-> flat {"a/b/c": leaf} dicts: the path names every manifest, regex and test speaks."""
from __future__ import annotations

from typing import Any, Mapping

import jax


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def flatten(tree: Any, is_leaf=None) -> dict[str, Any]:
  """{'layers/attn/q/kernel': leaf, ...} for a nested dict of arrays."""
  return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def as_flat(tree: Mapping[str, Any]) -> Mapping[str, Any]:
  """`flatten(tree)` for a nested parameter dict; a mapping that is already flat ({"a/b/c": leaf}, e.g. the artifact
  reader's lazy mapping, which loads a leaf when indexed) is returned untouched, so nothing is loaded or copied. Every
  parameter path has at least two parts, so a key holding "/" marks a flat mapping. (Leaves come in flatten's order:
  sorted paths.)"""
  if any("/" in k for k in tree):
    return tree
  return flatten(tree)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, x in flat.items():
    node = tree
    *parents, last = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = x
  return tree
