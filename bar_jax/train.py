"""The CLI: python -m bar_jax.train --config=configs/X.py[:arg] --workdir=DIR [--config.a.b=value ...]

Dispatches on config.stage to bar_jax/stages/<stage>.py, whose run(config, workdir) writes an artifact into workdir.
Bad input (BarError) prints one line and exits 2.
"""
from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bar_jax.errors import BarError

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of this run's artifact, checkpoints and metrics.")


def run(config, workdir: str) -> str:
  """Programmatic entry point (experiments call this)."""
  import jax
  if config.get("distributed", False):
    # TPU pods, SLURM, Open MPI and Kubernetes are detected by jax itself; anywhere else set JAX_COORDINATOR_ADDRESS
    # (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID (experiments/launch/README.md).
    env = os.environ
    explicit = ({"num_processes": int(env["JAX_NUM_PROCESSES"]), "process_id": int(env["JAX_PROCESS_ID"])}
                if "JAX_NUM_PROCESSES" in env and "JAX_PROCESS_ID" in env else {})
    jax.distributed.initialize(**explicit)
  if config.get("compilation_cache", ""):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache))
  stage = config.get("stage", None)
  if not stage:
    raise BarError("the config has no `stage`; set config.stage (e.g. 'train_lm', 'branch', 'merge')")
  try:
    module = importlib.import_module(f"bar_jax.stages.{stage}")
  except ModuleNotFoundError as e:
    if e.name == f"bar_jax.stages.{stage}":
      raise BarError(f"unknown stage {stage!r}: no module bar_jax/stages/{stage}.py") from None
    raise
  return module.run(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/bar_smollm2.py:quick")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: where this run's artifact goes")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
  try:
    out = run(_CONFIG.value, _WORKDIR.value)
  except BarError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(out)


def parse_flags(argv):
  """absl flag parsing with one-line errors (an unknown --config.key raises AttributeError deep in ml_collections)."""
  for a in argv[1:]:
    if a.startswith("--config="):
      path = a.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        print(f"error: config file {path} not found; pass an existing file, e.g. --config=configs/bar_smollm2.py",
              file=sys.stderr)
        sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    msg = " ".join(str(e).strip().strip('"').split())
    if isinstance(e, AttributeError):
      msg = f"unknown config key {msg} among {bad}: check the spelling against the config file's get_config()"
    print(f"error: bad command line: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
