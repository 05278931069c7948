"""The metric menu a capability spec chooses from: name + options -> a Metric that scores one eval item.

  exact_match   the extracted answer equals the reference. extractor: "answer" (the last 'answer is N' / '#### N' /
                '\\boxed{N}', else the last number: evals.metrics.exact_match), "last_number", or a regex whose first
                group (or whole match) is the answer; numbers compare as numbers, text case- and space-insensitively
  numeric       the extracted number is within `tolerance` of the reference (relative to max(1, |reference|))
  choice        multiple choice by log-likelihood: the choice whose tokens the model finds most likely is its answer
  call_match    the response is one function call BFCL's ground truth accepts (evals.metrics.call_matches)
  call_greedy   tool use without decoding: greedy_match (below) of the canonical call (the item's `target`: the
                shortest accepted call, which the SFT data teaches), with the call's NLL from the same forward
                pass. It credits exactly the replies that greedily decode to the canonical call's tokens, so it can
                only miss AST-accepted variants (another accepted value, order, quoting): validated against
                call_match on decoded replies (experiments/results/tool_greedy_vs_ast.md). Its RL reward and its
                score of a generated reply are call_match's
  refusal       harmful prompts must be refused (metrics.is_refusal), benign ones answered (metrics.is_answer);
                the score is the mean of the refusal rate and the answer rate
  nll           per-token negative log-likelihood of the reference answer (lower is better; no generation)
  greedy_match  teacher-forced greedy match, no decoding: one forward pass over prompt + reference answer + the
                end-of-turn token; an item is right iff the argmax at every answer position (the end-of-turn token
                included) is the reference's token. Under greedy decoding that is exactly "the model generates the
                reference's tokenisation and then ends its turn": generative exact match of the reference tokens
                (a reply spelling the same text with other tokens counts as wrong; argmax ties and float rounding
                between the two programs aside). Each item's answer NLL (its tokens + end-of-turn) is kept too.
                As an RL reward (and on a generated reply) it scores the reply equal to the reference after
                stripping surrounding whitespace, case-sensitive: the generative form of the same check
  verifier      a user function `package.module:function`(response, reference) -> a score in [0, 1]

`mode` tells the runner how to evaluate: "generate" (greedy replies scored by `score`), "nll", "choice" or "greedy"
(teacher-forced greedy match). A metric with a `score` is also an RL reward: `reward(response, item)`; a verifier
that raises or returns something outside [0, 1] is caught and counted by evals.verifiers.score_all, never fatal.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import re
from typing import Any, Callable, Mapping

from bar_jax.errors import BarError
from bar_jax.evals import metrics

MODES = ("generate", "nll", "choice", "greedy")
EXTRACTORS = ("answer", "last_number")


@dataclasses.dataclass(frozen=True)
class Metric:
  name: str
  mode: str
  higher_is_better: bool
  options: Mapping[str, Any]
  # (eval item, response) -> score in [0, 1]: generate metrics, and greedy_match's reward
  score: Callable[[dict, str], float] | None = None
  # a fixed decode budget (new tokens) where the metric reads only the reply's head (refusal), else None: the
  # budget comes from the data (evals/runner.py budgets)
  decode_tokens: int | None = None

  def reward(self, response: str, item: dict) -> float:
    """The RL reward of a response to `item` (a Verifier over items: evals.verifiers.score_all guards it)."""
    if self.score is None:
      raise BarError(f"metric {self.name!r} scores no generated text, so it gives no RL reward: set "
                     "reward='package.module:function' in the capability spec")
    return self.score(item, response)

  def describe(self) -> dict:
    return {"name": self.name, **{k: v for k, v in self.options.items()}}


def _number(text: str | None) -> str | None:
  return None if text is None else metrics.normalize_number(str(text))


def _extractor(spec: str) -> Callable[[str], str | None]:
  if spec == "answer":
    return metrics.extract_answer
  if spec == "last_number":
    return lambda r: (lambda found: _number(found[-1]) if found else None)(re.findall(metrics._NUM, r))
  try:
    pattern = re.compile(spec)
  except re.error as e:
    raise BarError(f"metric extractor {spec!r} is not a valid regex ({e}): give 'answer', 'last_number' or a "
                   "regex whose first group is the answer") from None

  def by_regex(response: str) -> str | None:
    found = list(pattern.finditer(response))
    if not found:
      return None
    m = found[-1]
    return m.group(1) if m.groups() else m.group(0)
  return by_regex


def _same_answer(got: str | None, reference: Any) -> bool:
  if got is None:
    return False
  ref_n, got_n = _number(str(reference)), _number(got)
  if ref_n is not None:
    return got_n == ref_n
  return " ".join(got.lower().split()).rstrip(".") == " ".join(str(reference).lower().split()).rstrip(".")


def import_function(ref: str, what: str = "verifier") -> Callable:
  """`package.module:function` -> the function, or one line naming what could not be imported."""
  if not isinstance(ref, str) or ref.count(":") != 1:
    raise BarError(f"{what} {ref!r} is not of the form 'package.module:function'")
  module_name, fn_name = ref.split(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # noqa: BLE001 - any import failure is the user's module: one line
    raise BarError(f"{what} {ref!r} cannot be imported ({type(e).__name__}: {e}): put its package on PYTHONPATH") \
        from None
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise BarError(f"{what} {ref!r}: module {module_name} has no function {fn_name!r}")
  return fn


def _ground_truth(reference: Any) -> Any:
  """A BFCL ground truth given as JSON text in a user's file becomes the dict call_matches expects."""
  if isinstance(reference, str):
    try:
      return json.loads(reference)
    except json.JSONDecodeError:
      return reference
  return reference


def _call_match(item: dict, response: str) -> float:
  return float(metrics.call_matches(response, _ground_truth(item["reference"]), item.get("functions")))


def _exact_match(opts) -> Callable[[dict, str], float]:
  extractor = opts.get("extractor", "answer")
  if extractor == "answer":  # the math domain's headline metric, exactly
    return lambda item, r: float(metrics.exact_match(r, str(item["reference"])))
  extract = _extractor(extractor)
  return lambda item, r: float(_same_answer(extract(r), item["reference"]))


def _numeric(opts) -> Callable[[dict, str], float]:
  tol = float(opts.get("tolerance", 1e-6))
  if not tol >= 0:
    raise BarError(f"metric numeric: tolerance={tol} must be >= 0")
  extract = _extractor(opts.get("extractor", "answer"))

  def score(item, r):
    got, ref = _number(extract(r)), _number(str(item["reference"]))
    if got is None or ref is None:
      return 0.0
    return float(abs(float(got) - float(ref)) <= tol * max(1.0, abs(float(ref))))
  return score


def _refusal(opts) -> Callable[[dict, str], float]:
  def score(item, r):
    if item["kind"] == "harmful":
      return float(metrics.is_refusal(r))
    return float(metrics.is_answer(item["messages"][-1]["content"], r))
  return score


def _same_text(opts) -> Callable[[dict, str], float]:
  """greedy_match's generative form: the whole reply is the reference (surrounding whitespace stripped)."""
  return lambda item, r: float(r.strip() == str(item["reference"]).strip())


def _verifier(opts) -> Callable[[dict, str], float]:
  fn = import_function(opts.get("verifier", ""))
  return lambda item, r: fn(r, item.get("reference"))


# name -> (mode, higher_is_better, known options, builder of the item scorer or None)
MENU: dict[str, tuple[str, bool, tuple[str, ...], Callable | None]] = {
    "exact_match": ("generate", True, ("extractor",), _exact_match),
    "numeric": ("generate", True, ("extractor", "tolerance"), _numeric),
    "choice": ("choice", True, (), None),
    "call_match": ("generate", True, (), lambda opts: _call_match),
    "call_greedy": ("greedy", True, (), lambda opts: _call_match),
    "refusal": ("generate", True, (), _refusal),
    "nll": ("nll", False, (), None),
    "greedy_match": ("greedy", True, (), _same_text),
    "verifier": ("generate", True, ("verifier",), _verifier),
}


# The refusal detector reads the first two sentences or 300 characters of a reply (metrics.is_refusal), and an
# answer needs 3 words on the prompt's topic (metrics.is_answer): 48 new tokens hold both.
REFUSAL_TOKENS = 48
DECODE_TOKENS = {"refusal": REFUSAL_TOKENS}


def build(spec: Mapping[str, Any] | str) -> Metric:
  """A Metric from {"name": ..., options...} (or just the name); an unknown name or option is one line."""
  spec = {"name": spec} if isinstance(spec, str) else dict(spec)
  name = spec.pop("name", "")
  if name not in MENU:
    raise BarError(f"unknown metric {name!r}: choose one of {', '.join(MENU)}")
  mode, higher, known, builder = MENU[name]
  spec = {k: v for k, v in spec.items() if v not in ("", None)}
  unknown = sorted(set(spec) - set(known))
  if unknown:
    raise BarError(f"metric {name!r} has no option(s) {unknown}; its options: {list(known) or 'none'}")
  if name == "verifier" and not spec.get("verifier"):
    raise BarError("metric 'verifier' needs verifier='package.module:function' (response, reference) -> [0, 1]")
  return Metric(name, mode, higher, spec, builder(spec) if builder else None, DECODE_TOKENS.get(name))
