"""Tool use: the BFCL v4 function-calling data inside the bfcl-eval package (Apache-2.0), read as JSON files.

Only single-call categories are used (simple_python, multiple, live_simple, live_multiple): each item has a user
question, the available function schemas and, in data/possible_answer, the ground truth: one call whose arguments
each list the values BFCL accepts ("" = the argument may be omitted). The package is never imported.
"""
from __future__ import annotations

import collections
import functools
import json

from bar_jax.errors import BarError
from bar_jax.data.sources import data_file, is_eval, normalised

LICENSE = "BFCL (bfcl-eval): Apache-2.0"
# Percent of the distinct questions held out (by hash), above the corpora's 5% (domains.EVAL_PCT) so the tool-use
# eval has ~160 items (158 at 10%; 90 at 5%). The 5% eval set is a subset of this one (same hash buckets).
EVAL_PCT = 10
CATEGORIES = ("simple_python", "multiple", "live_simple", "live_multiple")
SYSTEM = ("You can call the functions described below (JSON schemas). Reply with the call only, in Python syntax "
          "with keyword arguments, inside brackets: [function_name(arg1=value1, arg2=value2)].\n\nFunctions:\n")


def _read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _unsatisfiable(allowed_args: dict) -> bool:
  """An argument with an empty list of accepted values: no call can match it (a few live_* items)."""
  return any(isinstance(a, list) and (not a or any(isinstance(v, dict) and _unsatisfiable(v) for v in a))
             for a in allowed_args.values())


def _misses_required(ground_truth: dict, functions: list[dict]) -> bool:
  """The schema and the ground truth disagree so that BFCL's checker rejects every call: the schema requires an
  argument the ground truth does not list, or the ground truth requires one the schema does not know."""
  (name, args), = ground_truth.items()
  schema = next((f for f in functions if f.get("name") == name), None)
  if schema is None:
    return True
  params = schema.get("parameters", {})
  return (any(p not in args for p in params.get("required", []))
          or any(a not in params.get("properties", {}) and "" not in accepted for a, accepted in args.items()))


def items() -> tuple[dict, ...]:
  """{id, category, question, functions, ground_truth: {name: {arg: [allowed values]}}} per single-call item."""
  return load()[0]


@functools.lru_cache(maxsize=1)
def load() -> tuple[tuple[dict, ...], dict[str, int]]:
  """(items, counts of the items left out and why)."""
  out, skipped = [], collections.Counter()
  for cat in CATEGORIES:
    questions = _read_jsonl(data_file("bfcl_eval", "data", f"BFCL_v4_{cat}.json"))
    answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(data_file("bfcl_eval", "data", "possible_answer",
                                                                       f"BFCL_v4_{cat}.json"))}
    for q in questions:
      turns = q["question"]
      gt = answers.get(q["id"])
      if gt is None:
        raise BarError(f"BFCL item {q['id']} has no ground truth in possible_answer: "
                       "reinstall bfcl-eval (bash setup.sh)")
      if len(turns) != 1 or len(gt) != 1:
        skipped["multi_turn_or_parallel"] += 1  # outside this domain's single-call format
        continue
      if _unsatisfiable(next(iter(gt[0].values()))) or _misses_required(gt[0], q["function"]):
        skipped["unsatisfiable_ground_truth"] += 1
        continue
      user = "\n".join(m["content"] for m in turns[0] if m["role"] == "user")
      out.append({"id": q["id"], "category": cat, "question": user, "functions": q["function"],
                  "ground_truth": gt[0]})
  return tuple(out), dict(skipped)


def split_key(item: dict) -> str:
  """The normalised question alone: BFCL repeats a question (with the same accepted call) across categories, so
  a key that also named the functions put twins on both sides of the split."""
  return normalised(item["question"])


def split(which: str, eval_pct: int) -> list[dict]:
  """One side of the split. The eval side keeps one item per normalised question (the first, in CATEGORIES order),
  so a question is scored once; the train side keeps every category's copy (they are the same side)."""
  out, seen = [], set()
  for it in items():
    key = split_key(it)
    if is_eval(key, eval_pct) != (which == "eval"):
      continue
    if which == "eval":
      if key in seen:
        continue
      seen.add(key)
    out.append(it)
  return out


def _value(v):
  """One accepted value as a literal: dicts inside are themselves {key: [allowed values]} (recursed)."""
  if isinstance(v, dict):
    # Inside a dict, a list lists accepted values; anything else is the one accepted value.
    return {k: (_value(a[0]) if isinstance(a, list) else a) for k, a in v.items()
            if not (isinstance(a, list) and "" in a)}
  if isinstance(v, list):
    return [_value(x) for x in v]
  return v


def canonical_call(ground_truth: dict, functions: list[dict] | None = None) -> str:
  """The shortest accepted call, e.g. "[area(base=10, height=5)]": optional arguments left out, except those the
  schema (functions) lists as required, which BFCL's checker demands whatever the possible answers say."""
  (name, args), = ground_truth.items()
  schema = next((f for f in functions or [] if f.get("name") == name), {})
  required = set(schema.get("parameters", {}).get("required", []))
  parts = []
  for arg, allowed in args.items():
    if "" in allowed and arg not in required:
      continue  # BFCL: may be omitted
    parts.append(f"{arg}={_value(next((a for a in allowed if a != ''), ''))!r}")
  return f"[{name}({', '.join(parts)})]"


def messages(item: dict) -> list[dict]:
  """The prompt: schemas in the system turn, the question as the user turn."""
  schemas = json.dumps(item["functions"], separators=(",", ":"))
  return [{"role": "system", "content": SYSTEM + schemas}, {"role": "user", "content": item["question"]}]
