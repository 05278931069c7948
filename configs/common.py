"""Shared pieces of the config files: the variant argument parser and the default sections (mesh, compute, optimiser).

Every default a stage reads lives in configs/; the code reads keys and sets none.
"""
from __future__ import annotations

from typing import Any, Sequence

import ml_collections


def parse_arg(arg: str | None, *, positional: Sequence[str] = (), choices: dict[str, Sequence[str]] | None = None,
              **spec: Any) -> ml_collections.ConfigDict:
  """The `:arg` of `--config=configs/x.py:arg`, typed by `spec` (key=default), unknown words refused.

  Comma-separated words: `key=value` sets key (converted to its default's type); a bare word that names a bool key
  sets it True; any other bare word fills the next `positional` key. `choices` limits a key's values.
  E.g. parse_arg("math,lora,tiny", positional=["domain"], domain="math", lora=False, tiny=False).
  Raises ValueError with one line naming the word and the known ones (the CLI prints it and exits 2).
  """
  out = ml_collections.ConfigDict(dict(spec))
  free = list(positional)
  flags = [k for k, v in spec.items() if isinstance(v, bool)]
  known = ", ".join(flags + [f"{k}=..." for k in spec if k not in flags])
  for word in [w.strip() for w in (arg or "").split(",") if w.strip()]:
    if "=" in word:
      key, value = (x.strip() for x in word.split("=", 1))
      if key not in spec:
        raise ValueError(f"config argument {word!r}: {key!r} is not one of [{known}]")
      out[key] = _typed(key, value, spec[key])
      free = [k for k in free if k != key]
    elif word in flags:
      out[word] = True
    elif free:
      key = free.pop(0)
      out[key] = _typed(key, word, spec[key])
    else:
      raise ValueError(f"config argument {word!r} is not one of [{known}]")
  for key, allowed in (choices or {}).items():
    if out[key] not in allowed:
      raise ValueError(f"config argument {key}={out[key]!r}: use one of {list(allowed)}")
  return out


def _typed(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"config argument {key}={value!r}: use true or false")
  try:
    return type(default)(value) if isinstance(default, (int, float)) else value
  except ValueError:
    raise ValueError(f"config argument {key}={value!r}: not a {type(default).__name__}") from None


def mesh_config(**sizes) -> ml_collections.ConfigDict:
  """Every mesh axis spelled out, so `--config.mesh.fsdp=8` works on a locked config; -1 takes the rest."""
  d = {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}
  d.update(sizes)
  return ml_collections.ConfigDict(d)


def compute_config(**kw) -> ml_collections.ConfigDict:
  """How a run evaluates the model (bar_jax/model/config.py Compute: dtype, remat, attention, dispatch,
  capacity_factor; a key left out takes Compute's value): run-time, never part of a stage identity. The MoE's
  routing (top_k, norm_topk) is a config's `moe` section, which is."""
  d = {"dtype": "float32", "remat": "none", "attention": "xla"}
  d.update(kw)
  return ml_collections.ConfigDict(d)


def opt_defaults(**kw) -> ml_collections.ConfigDict:
  d = dict(lr=1e-4, warmup_steps=10, end_lr_frac=0.1, weight_decay=0.0, b1=0.9, b2=0.95, clip_norm=1.0,
           schedule="cosine", eps=1e-8, router_lr_mult=1.0)
  d.update(kw)
  return ml_collections.ConfigDict(d)
