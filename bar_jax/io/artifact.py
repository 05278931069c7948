"""Artifacts: the self-describing, verifiable model directories that stages hand to each other.

  DIR/manifest.json                 kind, model (ModelConfig.to_dict()), fingerprint, leaf_fingerprints, parents,
                                    ledger, stages, ... (written last: its presence marks a complete artifact)
  DIR/params/                       the parameter dict (orbax StandardCheckpointer); an artifact written over a
                                    base (a branch: manifest `over_base`) holds only the leaves and slices the base
                                    does not, and readers put those back from the base, checked by fingerprint
  DIR/tokenizer.json (+ tokenizer_chat.json)

Fingerprints: each leaf's is sha256 over its '/'-joined path, shape, dtype and little-endian C-order bytes; the
artifact's is sha256 over the sorted "path:leaf_fingerprint" lines. So the fingerprint covers names, shapes, dtypes
and bytes, and a stage can prove exactly which leaves it changed by comparing leaf_fingerprints.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import datetime
import glob
import json
import os
import shutil
import uuid
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from bar_jax import invocation
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


def nonfinite_count(x) -> int:
  """How many NaN/Inf values a leaf holds (0 for integer leaves)."""
  a = np.asarray(x)
  if a.dtype.kind in "iub":
    return 0
  return int(a.size - np.count_nonzero(np.isfinite(a)))


def check_finite(directory: str, params, doing: str) -> None:
  """BarError naming the first leaf with NaN/Inf: such a model is never written or accepted."""
  for path, x in sorted(flatten(params).items()):
    n = nonfinite_count(x)
    if n:
      raise BarError(f"{doing} {directory}: leaf {path} holds {n} NaN/Inf values (the training diverged or read a "
                     "damaged checkpoint); re-train it with a lower learning rate in a fresh --workdir")


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


def write(directory: str, params, manifest: dict[str, Any], tokenizer: Tokenizer, *, over_base: str | None = None,
          from_base: dict[str, tuple[str, int, int]] | None = None) -> str:
  """Writes an artifact atomically; returns its fingerprint. Refuses (BarError) if DIR already holds one.

  over_base: a base artifact directory. Leaves equal (bit for bit) to the base's leaf of the same path, and slices
  equal to a base leaf as `from_base` names them ({path: (base path, axis, index)}, e.g. a branch's anchor expert),
  are not stored; the manifest names the base by fingerprint and relative path (`over_base`), and every reader
  (read, open_params) puts them back. The fingerprints are always those of the complete parameters.

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
  check_finite(directory, params, "refusing to write artifact")
  from bar_jax.io.checkpoint import check_disk_room
  check_disk_room(os.path.dirname(directory), sum(np.asarray(x).nbytes for x in flatten(params).values()),
                  f"artifact {directory}")
  clean_interrupted_write(directory)

  leaf_fps = leaf_fingerprints(params)
  fp = _combine(leaf_fps)
  full = dict(_jsonable(manifest))
  if over_base is not None:
    params, full["over_base"] = _without_base(params, directory, over_base, from_base or {})
  full.setdefault("name", os.path.basename(directory))
  if invocation.command():  # the exact command line (config, workdir, every override) that made this artifact
    full.setdefault("command", invocation.command())
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


def _without_base(params, directory: str, base_dir: str, from_base: dict[str, tuple[str, int, int]]):
  """(the leaves and slices the base does not hold, the manifest's over_base entry)."""
  base = LazyParams(base_dir, verify=True)
  same = lambda a, b: a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()  # noqa: E731
  stored, leaves, slices = {}, [], {}
  for path, x in flatten(params).items():
    x = np.asarray(x)
    if path in base and same(x, np.asarray(base[path])):
      leaves.append(path)
      continue
    if path in from_base:
      base_path, axis, index = from_base[path]
      if base_path in base and same(np.take(x, index, axis=axis), np.asarray(base[base_path])):
        slices[path] = {"base": base_path, "axis": axis, "index": index}
        x = np.delete(x, index, axis=axis)
        if not x.size:  # the base slice was all of it
          continue
    stored[path] = x
  entry = {"fingerprint": base.manifest["fingerprint"], "path": os.path.relpath(base.directory, directory),
           "leaves": sorted(leaves), "slices": slices}
  return unflatten(stored), entry


def base_dir_of(directory: str, manifest: dict[str, Any]) -> str | None:
  """The base directory an artifact stored over (None if it is self-contained), or one BarError line."""
  ref = manifest.get("over_base")
  if not ref:
    return None
  base_dir = os.path.normpath(os.path.join(directory, ref["path"]))
  fix = ("put the base artifact back there, or re-run the branch stage with --config.self_contained=True for a "
         "copy that needs no base")
  if not os.path.isfile(os.path.join(base_dir, MANIFEST)):
    raise BarError(f"{directory} stores only what its training changed over base {ref['fingerprint'][:12]} at "
                   f"{base_dir}, which holds no artifact; {fix}")
  found = read_manifest(base_dir).get("fingerprint")
  if found != ref["fingerprint"]:
    raise BarError(f"{directory} stores only what its training changed over base {ref['fingerprint'][:12]}, but "
                   f"{base_dir} holds {str(found)[:12]}; {fix}")
  return base_dir


def _with_base(stored: dict[str, Any], ref: dict[str, Any], base) -> dict[str, Any]:
  """The complete flat parameters: stored leaves, base leaves, and stored leaves with their base slice put back."""
  flat = dict(stored)
  for path in ref["leaves"]:
    flat[path] = base[path]
  for path, s in ref["slices"].items():
    flat[path] = _insert(flat.get(path), np.asarray(base[s["base"]]), s["axis"], s["index"])
  return flat


def _insert(rest, base_slice, axis: int, index: int):
  if rest is None:
    return np.expand_dims(base_slice, axis)
  return np.insert(np.asarray(rest), index, base_slice, axis=axis)


def self_contained(src: str, dst: str) -> str:
  """A copy of artifact SRC at DST that stores every leaf (needs no base); returns its fingerprint."""
  art = read(src)
  manifest = {k: v for k, v in art.manifest.items() if k not in ("over_base", "fingerprint", "leaf_fingerprints")}
  return write(dst, jax.tree.map(np.asarray, art.params), manifest, art.tokenizer)

def clean_interrupted_write(directory: str) -> None:
  """Removes what a killed write() left (it is about to be written again, whole): the sibling temporary folders
  `.NAME.tmp-*` and, in a directory without a manifest, the files write() moves in (params/, tokenizer files)."""
  parent, name = os.path.dirname(directory), os.path.basename(directory)
  left = sorted(glob.glob(os.path.join(parent, f".{glob.escape(name)}.tmp-*")))
  if not os.path.exists(os.path.join(directory, MANIFEST)):
    left += [os.path.join(directory, n) for n in (PARAMS, "tokenizer.json", "tokenizer_chat.json")
             if os.path.lexists(os.path.join(directory, n))]
  for path in left:
    print(f"[artifact] removing {path}: left by an interrupted write of {directory}, which is written again now",
          flush=True)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


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
  base_dir = base_dir_of(directory, manifest)
  abstract = _abstract_params(directory, shardings if base_dir is None else None)
  path = os.path.join(directory, PARAMS)
  try:
    ckptr = ocp.StandardCheckpointer()
    params = ckptr.restore(path, abstract)
    ckptr.close()
  except Exception as e:
    raise BarError(f"cannot restore parameters at {path} ({type(e).__name__}); re-run the stage that writes it") \
        from None
  if base_dir is not None:
    base = flatten(read(base_dir, verify=False).params)  # verified below, as part of the complete parameters
    params = unflatten(_with_base({p: np.asarray(x) for p, x in flatten(params).items()}, manifest["over_base"],
                                  base))
    if shardings is not None:
      params = jax.device_put(params, shardings)
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
  check_finite(directory, params, "artifact fails verification:")


class LazyParams(collections.abc.Mapping):
  """Read-only {path: array} over an artifact's params; each leaf is read from disk when accessed (orbax partial
  restore), so a merge of N branches can stream leaf by leaf. verify=True checks each leaf's fingerprint on read."""

  def __init__(self, directory: str, verify: bool = True):
    self.directory = os.path.abspath(directory)
    self.manifest = read_manifest(self.directory)
    self._stored = flatten(_abstract_params(self.directory))
    self._abstract = dict(self._stored)
    self._verify = verify
    self._ckptr = ocp.PyTreeCheckpointer()
    base_dir = base_dir_of(self.directory, self.manifest)
    self._base = LazyParams(base_dir, verify=False) if base_dir else None
    if self._base is not None:  # shapes of the leaves the base fills in
      ref = self.manifest["over_base"]
      for p in ref["leaves"]:
        self._abstract[p] = self._base.shape(p)
      for p, s in ref["slices"].items():
        b = self._base.shape(s["base"])
        n = self._stored[p].shape[s["axis"]] + 1 if p in self._stored else 1
        shape = b.shape[:s["axis"]] + (n,) + b.shape[s["axis"]:]
        self._abstract[p] = jax.ShapeDtypeStruct(shape, b.dtype, sharding=b.sharding)

  def __getitem__(self, path: str):
    if path not in self._abstract:
      raise KeyError(path)
    ref = self.manifest.get("over_base")
    if ref and (path in ref["slices"] or path not in self._stored):  # (partly) the base's
      one = {"leaves": [path] if path in ref["leaves"] else [],
             "slices": {path: ref["slices"][path]} if path in ref["slices"] else {}}
      x = _with_base({path: self._read(path)} if path in self._stored else {}, one, self._base)[path]
    else:
      x = self._read(path)
    if self._verify:
      expected = self.manifest.get("leaf_fingerprints", {}).get(path)
      if leaf_fingerprint(path, x) != expected:
        raise BarError(f"artifact {self.directory} fails verification: leaf {path} is changed (fingerprint "
                       "mismatch); re-run the stage that wrote it")
      check_finite(self.directory, {path: x}, "artifact fails verification:")
    return x

  def _read(self, path: str):
    item = unflatten({path: self._stored[path]})
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                               dtype=a.dtype), item)
    tree = self._ckptr.restore(os.path.join(self.directory, PARAMS),
                               args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                           partial_restore=True))
    return flatten(tree)[path]

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._abstract))

  def __len__(self) -> int:
    return len(self._abstract)

  def shape(self, path: str) -> jax.ShapeDtypeStruct:
    """Shape and dtype without reading the bytes."""
    return self._abstract[path]


def open_params(directory: str, verify: bool = True) -> LazyParams:
  return LazyParams(directory, verify=verify)
