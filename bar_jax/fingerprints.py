"""Content fingerprints of parameters: pure functions of arrays (numpy and hashlib only), shared by the artifact
reader and writer and by the transforms that prove which leaves or experts changed; and of settings (config_hash).

Each leaf's fingerprint is sha256 over its '/'-joined path, shape, dtype and little-endian C-order bytes; a parameter
dict's is sha256 over the sorted "path:leaf_fingerprint" lines. So a fingerprint covers names, shapes, dtypes and
bytes.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np

from bar_jax.pytree import flatten


def leaf_fingerprint(path: str, x) -> str:
  a = np.ascontiguousarray(np.asarray(x))
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  h = hashlib.sha256()
  h.update(f"{path}|{list(a.shape)}|{a.dtype.name}|".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def leaf_fingerprints(params) -> dict[str, str]:
  return {path: leaf_fingerprint(path, x) for path, x in sorted(flatten(params).items())}


def combine(leaf_fps: Mapping[str, str]) -> str:
  """The parameter dict's fingerprint from its leaves' fingerprints."""
  return hashlib.sha256("".join(f"{p}:{leaf_fps[p]}\n" for p in sorted(leaf_fps)).encode()).hexdigest()


def fingerprint(params) -> str:
  """sha256 over sorted leaf paths, shapes, dtypes and bytes (via the per-leaf fingerprints)."""
  return combine(leaf_fingerprints(params))


def config_hash(d: Any) -> str:
  """16 hex digits of sha256 over d as sorted-key JSON (str() for what JSON cannot hold): a phase's data spec."""
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
