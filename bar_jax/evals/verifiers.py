"""Verifiable rewards: response text + reference -> a score in [0, 1], and a guard that never lets a verifier crash
a run.

  math      the final answer ("The answer is N", else the last number) equals the generator's answer
            (evals.metrics.exact_match, the math domain's headline metric)
  tool_use  the response is one call that BFCL's ground truth accepts (evals.metrics.call_matches, AST match)
  code      not offered: the code domain (the standard library's own function bodies) has no tests to run, and
            running model-written code safely needs a sandbox (no network, memory and time limits) this project does
            not ship. Code RL is left out.

`score_all` runs any verifier over a batch: an exception, a timeout, or a result that is not a finite number in
[0, 1] scores 0 and is counted by kind, so a bad verifier shows up in the metrics instead of killing the run.
"""
from __future__ import annotations

import math
import signal
import threading
from typing import Any, Callable, Sequence

from bar_jax.evals import metrics

Verifier = Callable[[str, Any], float]


def math_reward(response: str, reference: Any) -> float:
  return float(metrics.exact_match(response, str(reference)))


def tool_call_reward(response: str, ground_truth: dict) -> float:
  return float(metrics.call_matches(response, ground_truth))


VERIFIERS: dict[str, Verifier] = {"math": math_reward, "tool_use": tool_call_reward}


# ----------------------------------------------------------------------------------------------------------------
# The guard.

class VerifierTimeout(Exception):
  pass


def _call_with_timeout(fn: Verifier, response: str, reference: Any, timeout_s: float):
  """fn(response, reference), interrupted after timeout_s (SIGALRM timer: main thread only, else no limit)."""
  if not timeout_s or threading.current_thread() is not threading.main_thread():
    return fn(response, reference)

  def on_alarm(signum, frame):
    raise VerifierTimeout()

  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, timeout_s)
  try:
    return fn(response, reference)
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def score_all(fn: Verifier, responses: Sequence[str], references: Sequence[Any], timeout_s: float = 2.0
              ) -> tuple[list[float], dict[str, int]]:
  """Rewards in [0, 1] per response and failure counts {error, timeout, invalid}; a failure scores 0."""
  rewards, failures = [], {"error": 0, "timeout": 0, "invalid": 0}
  for response, reference in zip(responses, references):
    try:
      r = _call_with_timeout(fn, response, reference, timeout_s)
    except VerifierTimeout:
      failures["timeout"] += 1
      r = 0.0
    except Exception:  # noqa: BLE001 - any verifier bug scores 0 and is counted, by design
      failures["error"] += 1
      r = 0.0
    else:
      try:
        r = float(r)
        ok = math.isfinite(r) and 0.0 <= r <= 1.0
      except (TypeError, ValueError):
        ok = False
      if not ok:
        failures["invalid"] += 1
        r = 0.0
    rewards.append(r)
  return rewards, failures
