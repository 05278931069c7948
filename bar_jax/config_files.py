"""Reading configs/*.py: the CLI's config file by path, a stage's config by name with overrides (the pipeline and
experiments/ build every step's config this way), and whether a stage is installed.

  load_config_file(path, arg)           the CLI's --config=PATH[:arg]: get_config(arg), its failures one line
  stage_config(name, arg, overrides)    configs/<name>.py get_config(arg), updated by `overrides`
  apply_overrides(config, overrides)    a recursive update (dotted keys allowed) that refuses unknown keys
  stage_available(name)                 bar_jax/stages/<name>.py and configs/<name>.py both exist
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import traceback
from typing import Any

import ml_collections

from bar_jax.errors import BarError


def load_config_file(path: str, arg: str | None):
  """configs/X.py's get_config(arg); a file that fails to import or run is one BarError line: file, line, error."""
  abspath = os.path.abspath(path)
  try:
    spec = importlib.util.spec_from_file_location("bar_jax_cli_config", abspath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise BarError(f"config file {path} defines no get_config(); add one that returns an ml_collections ConfigDict")
    return module.get_config(arg) if arg is not None else module.get_config()
  except BarError:
    raise
  except SyntaxError as e:
    raise BarError(f"config file {e.filename or path}:{e.lineno}: SyntaxError: {e.msg}; fix that line") from None
  except Exception as e:  # noqa: BLE001 - any error of the user's file becomes one line naming where it happened
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == abspath]
    where = f"{path}:{frames[-1].lineno}" if frames else path
    msg = " ".join(str(e).split())
    raise BarError(f"config file {where}: {type(e).__name__}: {msg}"
                   + ("" if isinstance(e, ValueError) else "; fix that line")) from None


def config_module(name: str):
  """The module configs/<name>.py, imported as the package `configs` (the repository root on the path: run from it,
  or install the checkout with pip install -e .)."""
  try:
    return importlib.import_module(f"configs.{name}")
  except ModuleNotFoundError as e:
    if e.name in ("configs", f"configs.{name}"):
      raise BarError(f"cannot import configs.{name}: run from the repository root (where configs/ is), or pip "
                     "install -e . there") from None
    raise


def stage_config(name: str, arg: str | None = None, overrides: Any = None) -> ml_collections.ConfigDict:
  """configs/<name>.py get_config(arg), updated recursively with `overrides` (a dict or ConfigDict)."""
  try:
    config = config_module(name).get_config(arg)
  except ValueError as e:  # the variant parser's one line
    raise BarError(f"configs/{name}.py:{arg}: {e}") from None
  return apply_overrides(config, overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Any) -> ml_collections.ConfigDict:
  """Recursive update; dotted keys ("phases.sft.steps") are allowed too. Unknown keys raise one line."""
  if not overrides:
    return config
  d = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
  nested = {k: v for k, v in d.items() if "." not in k}
  dotted = {k: v for k, v in d.items() if "." in k}
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy: the caller's config is left alone
  _check_keys(config, nested, "")
  config.update(nested)
  for k, v in dotted.items():
    *parents, last = k.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise BarError(f"override {k!r}: the config has no {p!r}; check the key against configs/*.py")
      node = node[p]
    if last not in node:
      raise BarError(f"override {k!r} is not a key of the stage config; check it against configs/*.py")
    node[last] = v
  return config


def _check_keys(config, d: dict, prefix: str) -> None:
  for k, v in d.items():
    if k not in config:
      raise BarError(f"override {prefix + k!r} is not a key of the stage config; check it against configs/*.py")
    if isinstance(v, dict) and isinstance(config[k], ml_collections.ConfigDict) and v:
      _check_keys(config[k], v, prefix + k + ".")


def stage_available(name: str) -> bool:
  try:
    return (importlib.util.find_spec(f"bar_jax.stages.{name}") is not None
            and importlib.util.find_spec(f"configs.{name}") is not None)
  except ModuleNotFoundError:
    return False
