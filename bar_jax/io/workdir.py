"""The workdir contract: a stage's WORKDIR belongs to one stage identity, and every stage checks it the same way.

A stage identity is the canonical form of the stage's typed config (bar_jax/stage_configs.py: without its run-time
knobs, each input artifact named by its fingerprint instead of by its path; input_fingerprint below). It is written
into the stage's finished output (manifest.json's "identity", or the result file of a stage that writes no
artifact) and, from the moment a stage starts training, into WORKDIR/identity.json beside its checkpoints. A
recorded identity is compared after `migrate` (passed by the caller) has read it in today's form.

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
from typing import Any, Callable, Mapping

import jax

from bar_jax.errors import BarError

IDENTITY_FILE = "identity.json"
MANIFEST = "manifest.json"
FINISHED, RESUME, FRESH = "finished", "resume", "fresh"

PACKAGED = ("smollm2", "tiny")  # model names load_model resolves without a directory


def input_fingerprint(spec: Any) -> Any:
  """An input as an identity names it: an artifact dir -> its fingerprint; a list -> a list; a packaged name
  stands for itself; anything else stays as given (the stage's loader then says what is wrong with it)."""
  if isinstance(spec, (list, tuple)):
    return [input_fingerprint(s) for s in spec]
  spec = str(spec or "")
  if not spec or spec.split(":")[0] in PACKAGED:
    return spec
  try:
    with open(os.path.join(spec, MANIFEST)) as f:
      return json.load(f).get("fingerprint", spec)
  except (OSError, ValueError):
    return spec


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


def _migrated(found: Any, migrate: Callable[[Any], Any] | None, workdir: str) -> Any:
  if migrate is None or found is None:
    return found
  try:
    return migrate(found)
  except BarError as e:
    raise BarError(f"{workdir}: {e}") from None


def resolve(workdir: str, ident: Mapping, result_file: str = MANIFEST, *,
            migrate: Callable[[Any], Any] | None = None) -> str:
  """FINISHED, RESUME or FRESH for a stage of identity `ident` in WORKDIR, or one BarError line. Writes nothing.

  migrate: applied to the recorded identity before the comparison (identities stored by older code, read in
  today's form: bar_jax/stage_configs.py migrate_identity)."""
  state, found = recorded(workdir, result_file)
  found = _migrated(found, migrate, workdir)
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


def claim_checkpoints(directory: str, ident: Mapping, *, migrate: Callable[[Any], Any] | None = None) -> None:
  """A training loop's checkpoint folder: same identity -> resume, none yet -> claimed, another -> one BarError line."""
  state, found = recorded(directory, result_file=IDENTITY_FILE)
  found = _migrated(found, migrate, directory)
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
