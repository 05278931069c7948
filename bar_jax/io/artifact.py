"""Artifacts: the self-describing, verifiable model directories that stages hand to each other.

  DIR/manifest.json                 kind, model (ModelConfig.to_dict()), fingerprint, leaf_fingerprints, parents,
                                    ledger, stages, ... (written last: its presence marks a complete artifact)
  DIR/params/                       the parameter dict (orbax StandardCheckpointer)
  DIR/tokenizer.json (+ tokenizer_chat.json)

Fingerprints: each leaf's is sha256 over its '/'-joined path, shape, dtype and little-endian C-order bytes; the
artifact's is sha256 over the sorted "path:leaf_fingerprint" lines. So the fingerprint covers names, shapes, dtypes
and bytes, and a stage can prove exactly which leaves it changed by comparing leaf_fingerprints.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import datetime
import json
import os
import shutil
import uuid
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from bar_jax.data.tokenizer import Tokenizer
from bar_jax.errors import BarError
from bar_jax.fingerprints import combine as _combine, fingerprint, leaf_fingerprint, leaf_fingerprints  # noqa: F401
from bar_jax.pytree import flatten, unflatten
from bar_jax.model.config import ModelConfig

MANIFEST = "manifest.json"
PARAMS = "params"
KINDS = ("dense", "branch", "moe")
BAR_JAX_VERSION = "0.1.0"


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints.

# (leaf_fingerprint, leaf_fingerprints, fingerprint: bar_jax/fingerprints.py, pure so the transforms can use them.)


# ----------------------------------------------------------------------------------------------------------------
# Lineage and ledger.

def lineage(parents: list[dict[str, Any]], stages: list[dict[str, Any]]) -> dict[str, Any]:
  """`parents` and `ledger` fields for a new manifest.

  parents: the parents' manifests; each may carry a 'role' (e.g. 'base', 'branch'; default 'parent').
  The ledger keys spending by the fingerprint of the artifact that spent it, so an ancestor shared by several
  parents (the base of N branches) is counted once. This artifact's own stages go under 'self' until write()
  knows its fingerprint.
  """
  entries: dict[str, dict[str, float]] = {}
  for m in parents:
    for fp, e in (m.get("ledger") or {}).get("entries", {}).items():
      entries[fp] = {"tokens": e.get("tokens", 0), "flops": e.get("flops", 0)}
  own = {"tokens": sum(s.get("tokens", 0) for s in stages), "flops": sum(s.get("flops", 0) for s in stages)}
  entries["self"] = own
  return {
      "parents": [{"name": m.get("name"), "fingerprint": m.get("fingerprint"), "role": m.get("role", "parent")}
                  for m in parents],
      "stages": list(stages),
      "ledger": _ledger(entries),
  }


def _ledger(entries: dict[str, dict[str, float]]) -> dict[str, Any]:
  return {"tokens": sum(e["tokens"] for e in entries.values()),
          "flops": sum(e["flops"] for e in entries.values()), "entries": entries}


# ----------------------------------------------------------------------------------------------------------------
# Write.

def is_complete(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, MANIFEST)) and os.path.isdir(os.path.join(directory, PARAMS))


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if hasattr(x, "to_dict"):
    return _jsonable(x.to_dict())
  return x


def write(directory: str, params, manifest: dict[str, Any], tokenizer: Tokenizer) -> str:
  """Writes an artifact atomically; returns its fingerprint. Refuses (BarError) if DIR already holds one.

  Everything is written to a sibling temporary directory first. If DIR does not exist, that directory is renamed
  into place in one step; if DIR exists (e.g. it holds a running stage's checkpoints/), the files are moved in one
  by one and manifest.json last, so DIR only looks complete once it is.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, MANIFEST)):
    raise BarError(f"{directory} already holds an artifact; choose a new --workdir or delete it first")
  if manifest.get("kind") not in KINDS:
    raise BarError(f"artifact manifest kind={manifest.get('kind')!r}; use one of {KINDS}")
  if "model" not in manifest:
    raise BarError("artifact manifest has no 'model'; pass ModelConfig.to_dict()")
  ModelConfig.from_dict(manifest["model"])
  for name in (PARAMS, "tokenizer.json"):
    if os.path.exists(os.path.join(directory, name)):
      raise BarError(f"{os.path.join(directory, name)} exists without a manifest (an interrupted write?); "
                     "delete it and re-run")

  leaf_fps = leaf_fingerprints(params)
  fp = _combine(leaf_fps)
  full = dict(_jsonable(manifest))
  full.setdefault("name", os.path.basename(directory))
  if "ledger" in full:  # resolve lineage()'s 'self' entry now that the fingerprint is known
    entries = dict(full["ledger"].get("entries", {}))
    if "self" in entries:
      entries[fp] = entries.pop("self")
    full["ledger"] = _ledger(entries)
  full.update(fingerprint=fp, leaf_fingerprints=leaf_fps, bar_jax_version=BAR_JAX_VERSION,
              created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS), params)
    ckptr.wait_until_finished()
    ckptr.close()
    tokenizer.save(tmp)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(full, f, indent=1)
    if not os.path.exists(directory):
      os.rename(tmp, directory)
    else:
      for name in sorted(os.listdir(tmp), key=lambda n: n == MANIFEST):  # manifest last
        os.rename(os.path.join(tmp, name), os.path.join(directory, name))
      os.rmdir(tmp)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return fp


# ----------------------------------------------------------------------------------------------------------------
# Read.

@dataclasses.dataclass
class Artifact:
  dir: str
  manifest: dict[str, Any]
  cfg: ModelConfig
  params: Any
  tokenizer: Tokenizer

  @property
  def fingerprint(self) -> str:
    return self.manifest["fingerprint"]


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise BarError(f"no artifact at {directory}: the directory does not exist; check the path or run the stage "
                   "that writes it")
  if not os.path.isfile(path):
    raise BarError(f"{directory} is not a complete artifact (no {MANIFEST}); re-run the stage that writes it")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise BarError(f"cannot read {path} ({type(e).__name__}: {e}); re-run the stage that writes it") from None


def _abstract_params(directory: str, shardings=None):
  """ShapeDtypeStructs of the stored params, placed on `shardings` or on the first local device."""
  path = os.path.join(directory, PARAMS)
  meta = None
  if os.path.isdir(path):
    try:
      meta = ocp.StandardCheckpointer().metadata(path).item_metadata
    except Exception:  # orbax raises many types for a damaged checkpoint
      meta = None
  if meta is None:
    raise BarError(f"cannot read parameters at {path} (missing or damaged); re-run the stage that writes it")
  meta = jax.tree.map(lambda m: (tuple(m.shape), m.dtype), meta.tree if hasattr(meta, "tree") else meta,
                      is_leaf=lambda m: hasattr(m, "shape"))
  is_leaf = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)
  if shardings is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m[0], m[1], sharding=one), meta, is_leaf=is_leaf)
  return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m[0], m[1], sharding=s), meta, shardings, is_leaf=is_leaf)


def read(directory: str, *, shardings=None, verify: bool = True) -> Artifact:
  """Loads an artifact; with `shardings` (a tree like params) arrays are restored straight onto those devices."""
  directory = os.path.abspath(directory)
  manifest = read_manifest(directory)
  try:
    cfg = ModelConfig.from_dict(manifest["model"])
  except (KeyError, TypeError, ValueError) as e:
    raise BarError(f"{directory}/{MANIFEST} has no valid 'model' ({e}); re-run the stage that writes it") from None
  abstract = _abstract_params(directory, shardings)
  path = os.path.join(directory, PARAMS)
  try:
    ckptr = ocp.StandardCheckpointer()
    params = ckptr.restore(path, abstract)
    ckptr.close()
  except Exception as e:
    raise BarError(f"cannot restore parameters at {path} ({type(e).__name__}); re-run the stage that writes it") \
        from None
  if verify:
    verify_params(directory, manifest, params)
  return Artifact(directory, manifest, cfg, params, Tokenizer.load(directory))


def verify_params(directory: str, manifest: dict[str, Any], params) -> None:
  """BarError naming the artifact and the first leaf whose bytes differ from the manifest's fingerprints."""
  expected = manifest.get("leaf_fingerprints") or {}
  actual = leaf_fingerprints(params)
  for path in sorted(set(expected) | set(actual)):
    if expected.get(path) != actual.get(path):
      what = "missing" if path not in actual else "unexpected" if path not in expected else "changed"
      raise BarError(f"artifact {directory} fails verification: leaf {path} is {what} (fingerprint mismatch); "
                     "the files were altered or corrupted: re-run the stage that wrote it")
  if _combine(actual) != manifest.get("fingerprint"):
    raise BarError(f"artifact {directory} fails verification: its fingerprint does not match its leaves; "
                   "re-run the stage that wrote it")


class LazyParams(collections.abc.Mapping):
  """Read-only {path: array} over an artifact's params; each leaf is read from disk when accessed (orbax partial
  restore), so a merge of N branches can stream leaf by leaf. verify=True checks each leaf's fingerprint on read."""

  def __init__(self, directory: str, verify: bool = True):
    self.directory = os.path.abspath(directory)
    self.manifest = read_manifest(self.directory)
    self._abstract = flatten(_abstract_params(self.directory))
    self._verify = verify
    self._ckptr = ocp.PyTreeCheckpointer()

  def __getitem__(self, path: str):
    if path not in self._abstract:
      raise KeyError(path)
    item = unflatten({path: self._abstract[path]})
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                               dtype=a.dtype), item)
    tree = self._ckptr.restore(os.path.join(self.directory, PARAMS),
                               args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                           partial_restore=True))
    x = flatten(tree)[path]
    if self._verify:
      expected = self.manifest.get("leaf_fingerprints", {}).get(path)
      if leaf_fingerprint(path, x) != expected:
        raise BarError(f"artifact {self.directory} fails verification: leaf {path} is changed (fingerprint "
                       "mismatch); re-run the stage that wrote it")
    return x

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._abstract))

  def __len__(self) -> int:
    return len(self._abstract)

  def shape(self, path: str) -> jax.ShapeDtypeStruct:
    """Shape and dtype without reading the bytes."""
    return self._abstract[path]


def open_params(directory: str, verify: bool = True) -> LazyParams:
  return LazyParams(directory, verify=verify)
