"""The tool-use call matcher against BFCL's own AST checker (imported from the installed bfcl-eval package, with its
model registry stubbed out) over every BFCL item and realistic variants of its call, and on hand-checked replies."""
import collections
import sys
import types

import pytest

from bar_jax.data.sources import bfcl
from bar_jax.evals import metrics


@pytest.fixture(scope="module")
def bfcl_checker():
  """bfcl_eval's ast_checker. Its module imports the model registry (which imports every vendor SDK); the checker
  reads it only to rename dotted functions for some API models, so a registry that renames nothing stands in."""
  registry = types.ModuleType("bfcl_eval.constants.model_config")

  class NoRename:
    underscore_to_dot = False

  registry.MODEL_CONFIG_MAPPING = collections.defaultdict(NoRename)
  saved = sys.modules.get(registry.__name__)
  sys.modules[registry.__name__] = registry
  try:
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval import ast_checker
  finally:
    if saved is None:
      sys.modules.pop(registry.__name__, None)
    else:
      sys.modules[registry.__name__] = saved

  def check(item, name, args):
    try:
      out = ast_checker.ast_checker(item["functions"], [{name: args}], [item["ground_truth"]], Language.PYTHON,
                                    item["category"], "bar_jax")
    except (KeyError, TypeError, AttributeError):  # BFCL's checker crashes on a few malformed outputs: not a pass
      return False
    return bool(out["valid"])
  return check


def _call(name, args):
  return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"


def _variants(item):
  """Replies a model might give: the canonical call, bare and bracketed, and edits that BFCL's types or values
  judge (int <-> float, optional arguments given, strings re-cased, lists as tuples, a required argument dropped, an
  unknown one added)."""
  (name, gt), = item["ground_truth"].items()
  (_, base), = metrics.parse_calls(bfcl.canonical_call(item["ground_truth"], item["functions"]))
  yield "canonical", base
  yield "int_as_float", {k: float(v) if type(v) is int else v for k, v in base.items()}
  yield "float_as_int", {k: int(v) if type(v) is float and v == int(v) else v for k, v in base.items()}
  optional = {k: next(a for a in accepted if a != "") for k, accepted in gt.items()
              if "" in accepted and any(a != "" for a in accepted)}
  yield "optional_given", dict(base, **optional)
  yield "recased", {k: v.upper().replace(" ", "  ") if isinstance(v, str) else v for k, v in base.items()}
  yield "tuple_lists", {k: tuple(v) if isinstance(v, list) else v for k, v in base.items()}
  if base:
    yield "required_dropped", dict(list(base.items())[1:])
  yield "unknown_added", dict(base, zz_unknown_argument=1)


def test_matcher_agrees_with_bfcl_checker_on_every_item(bfcl_checker):
  counts, disagreements = collections.Counter(), []
  for item in bfcl.items():
    (name, _), = item["ground_truth"].items()
    for kind, args in _variants(item):
      reply = _call(name, args)
      ours = metrics.call_matches(reply, item["ground_truth"], item["functions"])
      theirs = bfcl_checker(item, name, args)
      counts[kind, theirs] += 1
      if ours != theirs:
        disagreements.append((item["id"], kind, reply[:120], ours, theirs))
  assert not disagreements, (len(disagreements), disagreements[:5])
  # The variants exercise both verdicts of each kind of edit (otherwise the comparison proves little).
  assert counts["canonical", True] > 1800 and counts["int_as_float", False] > 100, counts
  assert counts["float_as_int", True] > 10 and counts["required_dropped", False] > 1000, counts


SCHEMA = [{"name": "stats.mean", "description": "Mean of numbers.", "parameters": {"type": "dict", "properties": {
    "nums": {"type": "array", "items": {"type": "integer"}}, "precision": {"type": "integer"},
    "scale": {"type": "float"}, "unit": {"type": "string"}, "opts": {"type": "dict"}}, "required": ["nums"]}}]
GT = {"stats.mean": {"nums": [[1, 2]], "precision": [2, ""], "scale": [1.0, ""], "unit": ["cm", "centimetre", ""],
                     "opts": [{"round": [True]}, ""]}}


@pytest.mark.parametrize("reply,expected", [
    ("stats.mean(nums=[1, 2])", True),                            # a bare call (the old matcher scored 0)
    ("[stats.mean(nums=[1, 2])]", True),
    ("```python\nstats.mean(nums=[1, 2], unit='Centimetre')\n```", True),  # fenced; another accepted string
    ("stats.mean(nums=[1, 2], precision=5.0)", False),             # 5.0 is not an int (the old matcher said yes)
    ("stats.mean(nums=[1, 2], precision=2.0)", False),             # not even when it equals an accepted value
    ("stats.mean(nums=[1, 2], precision=2)", True),
    ("stats.mean(nums=[1, 2], scale=1)", True),                    # an int for a float: Python's promotion
    ("stats.mean(nums=[1, 2], precision=True)", False),            # a bool is not an int
    ("stats.mean(nums=[2, 1])", False),                            # list order matters
    ("stats.mean(nums=[1, 2], unit='inch')", False),
    ("stats.mean(nums=[1, 2], opts={'round': True})", True),
    ("stats.mean(nums=[1, 2], opts={'round': False})", False),
    ("stats.mean(precision=2)", False),                            # required argument missing
    ("stats.mean(nums=[1, 2], colour='red')", False),              # unknown argument
    ("stats.mean([1, 2])", False),                                 # positional: not BFCL's format
    ("[stats.mean(nums=[1, 2]), stats.mean(nums=[1, 2])]", False),  # one call expected, two given
    ("The mean of 1 and 2 is 1.5.", False),
    ("", False),
])
def test_call_match_hand_checked(reply, expected):
  assert metrics.call_matches(reply, GT, SCHEMA) is expected


def test_without_schema_the_accepted_values_give_the_types():
  gt = {"area": {"base": [10], "height": [5.0], "unit": ["units", ""]}}
  assert metrics.call_matches("area(base=10, height=5)", gt)          # int for a float answer: promoted
  assert not metrics.call_matches("area(base=10.0, height=5)", gt)    # float for an int answer: no
  assert metrics.call_matches("Here it is: [area(base=10, height=5.0, unit='Units')]", gt)
