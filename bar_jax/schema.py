"""Typed config sections: frozen dataclasses whose fields carry their type, their check and whether they are run-time.

A section is read from a plain mapping (a ConfigDict's to_dict(), a stored identity) by `parse`, which refuses with
one BarError line, naming the field's dotted path and the fix, a key the section does not have, a key it lacks, a
value of the wrong type and a value outside its field's check. Coercion is the one place a comma list is split:
a `list[...]` field takes a list, a tuple or a comma-separated string ("a,b" -> ["a", "b"]; "" -> []), so the
command line's `--config.x=a,b` and a config file's list give the same value.

  class Phase(Section):
    steps: int = setting(at_least(1))
    checkpoint_every: int = setting(at_least(1), runtime=True)   # how a run is carried out, never which result

Defaults live in the config files (configs/*.py), not here: every field without a default must be given. `canonical`
is a section as its stage identity stores it: run-time fields (and every field of a `model.config.Compute`
section) left out, JSON-normal values.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Callable, Mapping

from bar_jax.errors import BarError
from bar_jax.model.config import Compute

Check = tuple[Callable[[Any], bool], str]


def setting(check: Check | None = None, *, runtime: bool = False, default: Any = dataclasses.MISSING,
            coerce: Callable[[Any], Any] | None = None) -> Any:
  """A field: `check` = (predicate on the coerced value, what a valid value is); runtime: left out of identities;
  coerce: a field-specific conversion run before the type's (e.g. an index or a name); its ValueError is the line's
  reason."""
  meta = {"check": check, "runtime": runtime, "coerce": coerce}
  if default is dataclasses.MISSING:
    return dataclasses.field(metadata=meta)
  if isinstance(default, (list, dict)):
    return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------------------------
# Checks.

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def at_least(lo: int) -> Check:
  return (lambda v: v >= lo), f"an integer >= {lo}"


def in_range(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> Check:
  def ok(v):
    return math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  return ok, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def positive() -> Check:
  return in_range(0.0, math.inf, lo_open=True, hi_open=True)


def non_negative() -> Check:
  return in_range(0.0, math.inf, hi_open=True)


def one_of(*choices) -> Check:
  return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


def or_minus_one(check: Check) -> Check:
  """-1 (take the value from the capability spec) or what `check` allows."""
  ok, text = check
  return (lambda v: v == -1 or ok(v)), f"-1 (the capability spec's value) or {text}"


def every(check: Check) -> Check:
  """A list whose every item passes `check`."""
  ok, text = check
  return (lambda v: all(ok(x) for x in v)), f"a list of {text}"


# ----------------------------------------------------------------------------------------------------------------
# Sections.

class Section:
  """Base of every typed config section: read-only, attribute and item access, to_dict() and get() as ConfigDict
  readers expect, `validate()` for the checks that span fields."""

  def get(self, key: str, default: Any = None) -> Any:
    return getattr(self, key, default)

  def __getitem__(self, key: str) -> Any:
    if key not in self:
      raise KeyError(key)
    return getattr(self, key)

  def __contains__(self, key: str) -> bool:
    return key in {f.name for f in dataclasses.fields(self)}

  def keys(self):
    return [f.name for f in dataclasses.fields(self)]

  def items(self):
    return [(k, getattr(self, k)) for k in self.keys()]

  def to_dict(self) -> dict[str, Any]:
    return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

  def validate(self, path: str) -> None:
    """Checks across fields (one BarError line); the fields' own checks have passed."""

  def canonical_dict(self, d: dict[str, Any]) -> dict[str, Any]:
    """The identity's form of this section, from its fields' canonical values (a hook: e.g. phases not run left
    out)."""
    return d


def _plain(v: Any) -> Any:
  if dataclasses.is_dataclass(v) and not isinstance(v, type):
    return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
  if isinstance(v, Mapping):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  return v


def plain(v: Any) -> Any:
  """A section, ConfigDict or mapping as nested plain dicts and lists."""
  if hasattr(v, "to_dict") and not dataclasses.is_dataclass(v):
    v = v.to_dict()
  return _plain(v)


def _fail(path: str, value: Any, valid: str) -> BarError:
  return BarError(f"{path}={value!r} is invalid: it must be {valid}; set --{path} to such a value")


def _plural(tp: Any) -> str:
  return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(tp, "items")


def _type_name(tp: Any) -> str:
  return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _coerce(tp: Any, value: Any, path: str, missing_runtime: bool) -> Any:
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is Any:
    return plain(value)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    rest = [a for a in args if a is not type(None)]
    if len(rest) == 1:
      return _coerce(rest[0], value, path, missing_runtime)
    for a in rest:
      try:
        return _coerce(a, value, path, missing_runtime)
      except BarError:
        continue
    raise _fail(path, value, " or ".join(_type_name(a) for a in rest))
  if origin is typing.Literal:
    if value in args and type(value) in {type(a) for a in args}:
      return value
    raise _fail(path, value, "one of " + ", ".join(repr(a) for a in args))
  if origin is list:
    (item,) = args
    if isinstance(value, str):
      value = [v.strip() for v in value.split(",") if v.strip()]
      if item in (int, float):
        try:
          value = [item(v) for v in value]
        except ValueError:
          raise _fail(path, ",".join(value), f"a comma list of {_plural(item)}") from None
    if not isinstance(value, (list, tuple)):
      raise _fail(path, value, f"a list (or a comma-separated string) of {_plural(item)}")
    return [_coerce(item, v, f"{path}[{i}]", missing_runtime) for i, v in enumerate(value)]
  if origin is dict:
    key_tp, val_tp = args
    if not isinstance(value, Mapping):
      raise _fail(path, value, "a mapping")
    return {str(k): _coerce(val_tp, v, f"{path}.{k}", missing_runtime) for k, v in value.items()}
  if isinstance(tp, type) and dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if hasattr(value, "to_dict") and not dataclasses.is_dataclass(value):
      value = value.to_dict()
    if not isinstance(value, Mapping):
      raise _fail(path, value, f"a section ({', '.join(f.name for f in dataclasses.fields(tp))})")
    return parse(tp, value, path, missing_runtime=missing_runtime)
  if tp is bool:
    if isinstance(value, bool):
      return value
  elif tp is int:
    if _is_int(value):
      return value
  elif tp is float:
    if _is_num(value):
      return float(value)
  elif tp is str:
    if isinstance(value, str):
      return value
  else:
    raise TypeError(f"bug: schema type {tp!r} at {path} is not supported")
  raise _fail(path, value, _type_name(tp))


def parse(cls, d: Mapping[str, Any], path: str = "config", *, missing_runtime: bool = False):
  """cls (a Section dataclass, or another dataclass such as Compute) from mapping d, or one BarError line.

  missing_runtime: run-time fields may be absent (a stored identity holds none); they become None."""
  d = plain(d)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise BarError(f"{path}.{unknown[0]} is not a setting here (this section has {', '.join(fields)}): check the "
                   "key against configs/*.py")
  hints, out = _hints(cls), {}
  for name, f in fields.items():
    where = f"{path}.{name}"
    if name not in d:
      runtime = f.metadata.get("runtime") or _is_compute(hints[name])
      if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
        continue
      if missing_runtime and runtime:
        out[name] = None
        continue
      raise BarError(f"{where} is missing: every setting is given by its config file (configs/*.py); add it there")
    value = d[name]
    coerce = f.metadata.get("coerce")
    if coerce is not None:
      try:
        value = coerce(value)
      except ValueError as e:
        raise BarError(f"{where}={value!r}: {e}") from None
    value = _coerce(hints[name], value, where, missing_runtime)
    check = f.metadata.get("check")
    if check is not None and value is not None:
      ok, valid = check
      try:
        good = ok(value)
      except TypeError:
        good = False
      if not good:
        raise _fail(where, value, valid)
    out[name] = value
  try:
    obj = cls(**out)
  except ValueError as e:  # a dataclass's own __post_init__ check
    raise BarError(f"{path}: {e}") from None
  if isinstance(obj, Section):
    obj.validate(path)
  elif hasattr(obj, "validate"):
    try:
      obj.validate()
    except ValueError as e:
      raise BarError(f"{path}: {e}") from None
  return obj


def _is_compute(tp: Any) -> bool:
  """A `Compute` section (how a run evaluates the model) is run-time as a whole: the one list of its keys is
  Compute's fields."""
  return tp is Compute


def canonical(obj: Any) -> Any:
  """A section as an identity stores it: run-time fields and Compute sections dropped, JSON-normal values."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    hints = _hints(type(obj))
    d = {f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)
         if not f.metadata.get("runtime") and not _is_compute(hints[f.name])}
    if isinstance(obj, Section):
      d = obj.canonical_dict(d)
    return d
  if isinstance(obj, Mapping):
    return {str(k): canonical(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [canonical(v) for v in obj]
  return json.loads(json.dumps(obj))


def runtime_fields(cls, seen: set | None = None) -> set[str]:
  """Names of the run-time fields of cls and every section below it (Compute's fields included)."""
  seen = set() if seen is None else seen
  if cls in seen:
    return set()
  seen.add(cls)
  out = set()
  for f in dataclasses.fields(cls):
    tp = _hints(cls)[f.name]
    if f.metadata.get("runtime"):
      out.add(f.name)
    if _is_compute(tp):
      out |= {g.name for g in dataclasses.fields(tp)}
    for sub in _sections_in(tp):
      out |= runtime_fields(sub, seen)
  return out


def _sections_in(tp: Any) -> list:
  if isinstance(tp, type) and dataclasses.is_dataclass(tp):
    return [tp]
  return [s for a in typing.get_args(tp) for s in _sections_in(a)]
