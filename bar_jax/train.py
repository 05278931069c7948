"""The CLI: python -m bar_jax.train --config=configs/X.py[:arg] --workdir=DIR [--config.a.b=value ...]

Dispatches on config.stage to bar_jax/stages/<stage>.py, whose run(config, workdir) writes an artifact into workdir.
Before any work: the config is read into its stage's typed schema (bar_jax/stage_configs.py: every setting typed and
range-checked) and the workdir is checked to be a writable directory with disk space (bar_jax/preflight.py).
List-valued settings take comma lists (--config.domains=math,code; --config.eval.domains= is the empty list). Bad
input, a config file that fails to import and an operating-system failure (full disk, read-only folder) each print
one line and exit 2. SIGTERM during training stops at the next step boundary
with a checkpoint and one line, exit 75 (errors.PREEMPTED_EXIT); the same command resumes. A finished run prints a
summary per artifact (steps, tokens, loss first -> last, seconds, tokens/s, fingerprint, size); the exact command
line goes into every manifest written.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bar_jax import config_files, invocation
from bar_jax.errors import PREEMPTED_EXIT, BarError, Preempted, os_failure

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of this run's artifact, checkpoints and metrics.")
_FALLBACK = flags.DEFINE_bool("checkpoint_fallback", False,
                              "Resume from the previous good checkpoint when the latest fails its checksums "
                              "(the damaged one is moved to checkpoints.damaged/): --config.checkpoint_fallback=True "
                              "of a stage that trains (a pipeline passes it to each such step).")
_MIN_FREE_MB = flags.DEFINE_float("min_free_mb", 256, "Refuse to start with less free disk (MiB) under --workdir.")

_LIST_OVERRIDES: list[tuple[str, list]] = []  # --config.KEY=a,b for list-valued KEYs, applied after flag parsing


def run(config, workdir: str, min_free_mb: float | None = None) -> str:
  """Programmatic entry point (experiments call this)."""
  import jax
  from bar_jax import preflight, stage_configs
  # Settings first (the stage's typed schema: types, ranges, lists), then the disk: both before any parameter is
  # read or any step runs.
  config = stage_configs.load(config)
  preflight.check_workdir(workdir, preflight.MIN_FREE_MB if min_free_mb is None else min_free_mb)
  if config.get("distributed", False):
    # TPU pods, SLURM, Open MPI and Kubernetes are detected by jax itself; anywhere else set JAX_COORDINATOR_ADDRESS
    # (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID (experiments/launch/README.md).
    env = os.environ
    explicit = ({"num_processes": int(env["JAX_NUM_PROCESSES"]), "process_id": int(env["JAX_PROCESS_ID"])}
                if "JAX_NUM_PROCESSES" in env and "JAX_PROCESS_ID" in env else {})
    jax.distributed.initialize(**explicit)
  if config.get("compilation_cache", ""):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache))
  stage = config.stage
  try:
    module = importlib.import_module(f"bar_jax.stages.{stage}")
  except ModuleNotFoundError as e:
    if e.name == f"bar_jax.stages.{stage}":
      raise BarError(f"unknown stage {stage!r}: no module bar_jax/stages/{stage}.py") from None
    raise
  return module.run(config, workdir)


# ----------------------------------------------------------------------------------------------------------------
# What a run did.

def _size_mb(path: str) -> float:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(root, f))
      except OSError:
        pass
  return total / 2**20


def summary_line(artifact_dir: str) -> str | None:
  """One line from an artifact's manifest: steps, tokens, loss first -> last, seconds, tokens/s, fingerprint, size."""
  try:
    with open(os.path.join(artifact_dir, "manifest.json")) as f:
      m = json.load(f)
  except (OSError, ValueError):
    return None
  stages = [s for s in m.get("stages", []) if s.get("steps")]
  steps = sum(int(s.get("steps", 0)) for s in stages)
  tokens = sum(float(s.get("tokens", 0) or 0) for s in stages)
  seconds = sum(float(s.get("seconds", 0) or 0) for s in stages)
  firsts = [s.get("loss_first") for s in stages if s.get("loss_first") is not None]
  lasts = [s.get("loss_last") for s in stages if s.get("loss_last") is not None]
  parts = [f"{m.get('kind', '?')} artifact"]
  if steps:
    parts.append(f"{steps} steps, {tokens:,.0f} tokens")
    if firsts and lasts:
      parts.append(f"loss {firsts[0]:.4f} -> {lasts[-1]:.4f}")
    if seconds:
      parts.append(f"{seconds:.1f} s training ({tokens / seconds:,.0f} tokens/s)")
  else:
    parts.append("no training steps")
  parts.append(f"fingerprint {str(m.get('fingerprint', ''))[:16]}")
  parts.append(f"{_size_mb(os.path.join(artifact_dir, 'params')):.1f} MiB params")
  return ", ".join(parts)


def summarize(workdir: str) -> list[str]:
  """Summary lines of the workdir's artifact, or of each artifact one level below it (a pipeline)."""
  own = summary_line(workdir)
  if own:
    return [f"[summary] {workdir}: {own}"]
  lines = []
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
    line = summary_line(os.path.join(workdir, name))
    if line:
      lines.append(f"[summary] {name}: {line}")
  return lines


# ----------------------------------------------------------------------------------------------------------------
# The command line.

def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; settings go as --config.KEY=VALUE")
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/bar_smollm2.py:quick")
  if not _WORKDIR.value:
    _fail("--workdir is required: where this run's artifact goes, e.g. --workdir=runs/my_run")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
  config = _CONFIG.value
  for key, value in _LIST_OVERRIDES:
    *parents, last = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[last] = type(node[last])(value)  # list stays list, tuple stays tuple
  if _FALLBACK.value and "checkpoint_fallback" in config:  # a stage without the key keeps no training checkpoints
    config.checkpoint_fallback = True
  try:
    out = run(config, _WORKDIR.value, min_free_mb=_MIN_FREE_MB.value)
  except BarError as e:
    _fail(str(e))
  except Preempted as e:  # SIGTERM: stopped at a step boundary with a checkpoint (bar_jax/stages/loop.py)
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT)
  except Exception as e:  # an operating-system failure deep in a library prints one line; anything else is a bug
    line = os_failure(e)
    if line is None:
      raise
    _fail(line)
  for line in summarize(out):
    print(line)
  print(out)


def _list_overrides(argv: list[str], config) -> tuple[list[str], list[tuple[str, list]]]:
  """Takes --config.KEY=a,b out of argv where KEY holds a list (ml_collections cannot override lists) and returns
  (the rest of argv, [(KEY, [a, b])]), each item converted to the type of the list's current items."""
  rest, lists = [], []
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      key, value = a[len("--config."):].split("=", 1)
      node, ok = config, True
      for p in key.split("."):
        if hasattr(node, "keys") and p in node:
          node = node[p]
        else:
          ok = False
          break
      if ok and isinstance(node, (list, tuple)):
        items = [v.strip() for v in value.split(",") if v.strip()]
        kind = type(node[0]) if node and all(type(x) is type(node[0]) for x in node) else str
        try:
          items = [_convert(v, kind) for v in items]
        except ValueError:
          raise BarError(f"--config.{key}={value}: each item must be {kind.__name__} like {list(node)}") from None
        lists.append((key, items))
        continue
    rest.append(a)
  return rest, lists


def _convert(v: str, kind):
  if kind is bool:
    if v.lower() not in ("true", "false", "1", "0"):
      raise ValueError(v)
    return v.lower() in ("true", "1")
  return kind(v)


def parse_flags(argv):
  """absl flag parsing with one-line errors (an unknown --config.key raises AttributeError deep in ml_collections)."""
  invocation.record(["python", "-m", "bar_jax.train"] + argv[1:])
  config_args = [a for a in argv[1:] if a.startswith("--config=")]
  if config_args:
    spec = config_args[-1].split("=", 1)[1]
    path, arg = (spec.split(":", 1) + [None])[:2]
    if not os.path.isfile(path):
      _fail(f"config file {path} not found; pass an existing file, e.g. --config=configs/bar_smollm2.py")
    try:  # import it here once, so its errors are one line and its list-valued keys are known
      argv, lists = _list_overrides(argv, config_files.load_config_file(path, arg))
    except BarError as e:
      _fail(str(e))
    _LIST_OVERRIDES[:] = lists
    sys.argv[:] = argv  # ml_collections reads its --config.* overrides from sys.argv itself
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    msg = " ".join(str(e).strip().strip('"').split())
    if isinstance(e, (AttributeError, KeyError)):
      msg = f"unknown config key {msg} among {bad}: check the spelling against the config file's get_config()"
    _fail(f"bad command line: {msg}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
