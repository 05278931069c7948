"""The workdir contract: a stage's WORKDIR belongs to one stage identity, and every stage checks it the same way.

A stage identity is the stage's resolved config without its run-time knobs (RUNTIME_KEYS: precision, remat, the
attention kernel, MoE dispatch, the mesh, multi-host start-up, checkpoint and logging cadence), with each input
(INPUTS) named by the fingerprint of the artifact it points at instead of by its path. It is written into the
stage's finished output (manifest.json's "identity", or the result file of a stage that writes no artifact) and,
from the moment a stage starts training, into WORKDIR/identity.json beside its checkpoints.

What a stage finds in WORKDIR decides what it does; the first rule that applies wins:
  1. A finished output (result_file present, e.g. manifest.json):
       same identity         -> returned as it is (FINISHED): nothing runs, nothing is written;
       another identity, or none recorded -> one BarError line; nothing is touched.
  2. WORKDIR/identity.json (a run that started and has not finished):
       same identity         -> RESUME: the training loop continues from its last checkpoint;
       another identity      -> one BarError line; nothing is touched.
  3. No WORKDIR, or an empty one -> FRESH: a new run.
  4. Anything else in WORKDIR (files no stage identity claims) -> one BarError line; nothing is touched.
Run-time knobs may differ between a run and its resume or re-use: an artifact trained with remat=full is returned as
it is to a run that asks for remat=none.

The pipeline (stages/pipeline.py) goes one step further for its own steps: a step whose folder records another
identity is moved aside (set_aside: DIR -> DIR.stale[N], never deleted) and run again.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax

from bar_jax.errors import BarError

IDENTITY_FILE = "identity.json"
MANIFEST = "manifest.json"
FINISHED, RESUME, FRESH = "finished", "resume", "fresh"

# Keys that change how a result is computed or stored, never which result: dropped from the identity at any depth.
RUNTIME_KEYS = frozenset({"dtype", "remat", "attention", "dispatch", "mesh", "distributed", "compilation_cache",
                          "place_on_mesh", "checkpoint_every", "log_every", "keep_checkpoints", "self_contained",
                          "drift_dir"})
# Per stage: the config keys that name input artifacts (directories, comma lists, or packaged names).
INPUTS = {"train_lm": ("base",), "branch": ("base", "expert_init"), "rl": ("model",), "router": ("model",),
          "upgrade": ("model", "branch"), "merge": ("branches", "base"), "evaluate": ("model", "drift_base"),
          "export_hf": ("model",), "import_base": (), "base": ("base",)}
PACKAGED = ("smollm2", "tiny")  # model names load_model resolves without a directory


def strip_runtime(d: Any) -> Any:
  """d without RUNTIME_KEYS at any depth (sections left empty by that are dropped too)."""
  if isinstance(d, Mapping):
    out = {}
    for k, v in d.items():
      if k in RUNTIME_KEYS:
        continue
      v = strip_runtime(v)
      if isinstance(v, dict) and not v and isinstance(d[k], Mapping) and d[k]:
        continue
      out[k] = v
    return out
  if isinstance(d, (list, tuple)):
    return [strip_runtime(v) for v in d]
  return d


def input_fingerprint(spec: Any) -> Any:
  """An input as the identity names it: an artifact dir -> its fingerprint; a comma list -> a list; a packaged name
  stands for itself; anything else stays as given (the stage's loader then says what is wrong with it)."""
  if isinstance(spec, (list, tuple)) or (isinstance(spec, str) and "," in spec):
    items = spec if isinstance(spec, (list, tuple)) else spec.split(",")
    return [input_fingerprint(s.strip()) for s in items if str(s).strip()]
  spec = str(spec or "")
  if not spec or spec.split(":")[0] in PACKAGED:
    return spec
  try:
    with open(os.path.join(spec, MANIFEST)) as f:
      return json.load(f).get("fingerprint", spec)
  except (OSError, ValueError):
    return spec


def identity(config) -> dict[str, Any]:
  """The stage identity of a stage config (a ConfigDict or dict with `stage`): see the module docstring."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  stage = d.get("stage")
  if stage not in INPUTS:
    raise BarError(f"stage {stage!r} has no entry in bar_jax/io/workdir.py INPUTS; add its input keys there")
  for key in INPUTS[stage]:
    if key in d:
      d[key] = input_fingerprint(d[key])
  return _normal(strip_runtime(d))


def _normal(d: Any) -> Any:
  """JSON round trip: tuples become lists and numbers their JSON form, so a stored identity compares equal."""
  return json.loads(json.dumps(d, sort_keys=True, default=str))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out or {prefix[:-1]: {}}
  return {prefix[:-1]: d}


def differences(a: Mapping, b: Mapping, limit: int = 4) -> str:
  """'key: old -> new' for the first `limit` dotted keys where two identities differ."""
  fa, fb = _flat(dict(a)), _flat(dict(b))
  keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
  shown = [f"{k}: {_short(fa.get(k))} -> {_short(fb.get(k))}" for k in keys[:limit]]
  return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def _short(v: Any) -> str:
  s = json.dumps(v, default=str)
  return s if len(s) <= 40 else s[:37] + "..."


def recorded(workdir: str, result_file: str = MANIFEST) -> tuple[str | None, dict | None]:
  """(what holds it, the identity recorded in WORKDIR): ('finished' | 'started' | None, identity or None)."""
  for state, name in ((FINISHED, result_file), ("started", IDENTITY_FILE)):
    path = os.path.join(workdir, name)
    if os.path.isfile(path):
      try:
        with open(path) as f:
          data = json.load(f)
      except (OSError, ValueError):
        return state, None
      return state, data.get("identity") if isinstance(data, dict) else None
  return None, None


def resolve(workdir: str, ident: Mapping, result_file: str = MANIFEST) -> str:
  """FINISHED, RESUME or FRESH for a stage of identity `ident` in WORKDIR, or one BarError line. Writes nothing."""
  state, found = recorded(workdir, result_file)
  stage = ident.get("stage", "stage")
  if state is not None:
    what = "finished output" if state == FINISHED else "started run (checkpoints)"
    if found is None:
      raise BarError(f"{workdir} holds a {what} that records no stage identity (written by an older bar_jax, or "
                     "damaged); use a new --workdir, or move it aside to run again")
    if found != _normal(dict(ident)):
      raise BarError(f"{workdir} holds a {what} of another {stage} run ({differences(found, ident)}); use a new "
                     "--workdir, or the config it was made with")
    return FINISHED if state == FINISHED else RESUME
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise BarError(f"{workdir} holds files of no recorded run ({', '.join(sorted(os.listdir(workdir))[:3])}...); "
                   "use a new --workdir, or move it aside")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise BarError(f"--workdir {workdir} is a file; pass a directory")
  return FRESH


def start(workdir: str, ident: Mapping) -> None:
  """Claims WORKDIR for `ident` (writes WORKDIR/identity.json) before the first checkpoint is written."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0 and not os.path.isfile(os.path.join(workdir, IDENTITY_FILE)):
    write_text_atomic(os.path.join(workdir, IDENTITY_FILE),
                      json.dumps({"identity": _normal(dict(ident))}, indent=1, sort_keys=True))


def claim_checkpoints(directory: str, ident: Mapping) -> None:
  """A training loop's checkpoint folder: same identity -> resume, none yet -> claimed, another -> one BarError line."""
  state, found = recorded(directory, result_file=IDENTITY_FILE)
  if state is not None and found != _normal(dict(ident)):
    raise BarError(f"workdir {directory} holds a checkpoint of another run ({differences(found or {}, ident)}); "
                   "use a fresh --workdir or the original config")
  start(directory, ident)


def set_aside(path: str) -> str | None:
  """Moves PATH to PATH.stale (then .stale2, ...): kept, never deleted or overwritten. Returns the new path."""
  if not os.path.exists(path):
    return None
  base = path.rstrip(os.sep) + ".stale"
  stale, n = base, 1
  while os.path.exists(stale):
    n += 1
    stale = f"{base}{n}"
  os.replace(path, stale)
  return stale


def write_text_atomic(path: str, text: str) -> None:
  """PATH holds either its old content or `text`, never a torn mix (a kill during the write leaves PATH.tmp)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
