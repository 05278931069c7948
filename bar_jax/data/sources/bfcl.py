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
from bar_jax.data.sources import data_file, is_eval

LICENSE = "BFCL (bfcl-eval): Apache-2.0"
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
      if _unsatisfiable(next(iter(gt[0].values()))):
        skipped["unsatisfiable_ground_truth"] += 1
        continue
      user = "\n".join(m["content"] for m in turns[0] if m["role"] == "user")
      out.append({"id": q["id"], "category": cat, "question": user, "functions": q["function"],
                  "ground_truth": gt[0]})
  return tuple(out), dict(skipped)


def split_key(item: dict) -> str:
  return item["question"] + "\n" + json.dumps(sorted(f["name"] for f in item["functions"]))


def split(which: str, eval_pct: int) -> list[dict]:
  return [it for it in items() if is_eval(split_key(it), eval_pct) == (which == "eval")]


def _value(v):
  """One accepted value as a literal: dicts inside are themselves {key: [allowed values]} (recursed)."""
  if isinstance(v, dict):
    # Inside a dict, a list lists accepted values; anything else is the one accepted value.
    return {k: (_value(a[0]) if isinstance(a, list) else a) for k, a in v.items()
            if not (isinstance(a, list) and "" in a)}
  if isinstance(v, list):
    return [_value(x) for x in v]
  return v


def canonical_call(ground_truth: dict) -> str:
  """The shortest accepted call, e.g. "[area(base=10, height=5)]": optional arguments left out."""
  (name, args), = ground_truth.items()
  parts = []
  for arg, allowed in args.items():
    if "" in allowed:
      continue  # BFCL: may be omitted
    parts.append(f"{arg}={_value(allowed[0])!r}")
  return f"[{name}({', '.join(parts)})]"


def messages(item: dict) -> list[dict]:
  """The prompt: schemas in the system turn, the question as the user turn."""
  schemas = json.dumps(item["functions"], separators=(",", ":"))
  return [{"role": "system", "content": SYSTEM + schemas}, {"role": "user", "content": item["question"]}]
