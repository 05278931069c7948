"""Instruction following with verifiable constraints, scored by the maintained IFBench checkers of `if-verifiable`.

  follows_all(response, reference) -> 1.0 when the response meets every instruction of its prompt (IFBench's
  "prompt-level strict" accuracy), else 0.0. reference = {"prompt", "instruction_id_list", "kwargs"}.

This is a verifier of the metric menu (`verifier: bar_jax.evals.instructions:follows_all`), so the instruction-
following capability is a spec like any other (configs/capabilities/instruction_following.py). The checkers, the
handling of their arguments (None-valued ones dropped, the prompt passed to the kinds that quote it) and the
strict/loose variants are the library's own (if_verifiable.common.evaluate_instructions); bar_jax only picks the
strict prompt-level score and refuses an instruction kind the library does not know (the library would skip it).
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

from bar_jax.errors import BarError


@contextlib.contextmanager
def _no_downloads():
  """if_verifiable.ifbench downloads NLTK data when imported; offline that only prints errors and waits on the
  network. The kinds that need the data are left out of the prompts (data.sources.ifbench.NEEDS_NLTK_DATA)."""
  import nltk
  download = nltk.download
  nltk.download = lambda *args, **kwargs: False
  try:
    yield
  finally:
    nltk.download = download


# Imported with this module (~2 s with nltk), not at the first reply: a verifier runs under a 2 s timeout
# (evals.verifiers.score_all), and an import it interrupts leaves the library half-imported for every later reply.
try:
  with _no_downloads():
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT
except ImportError as e:
  raise BarError(f"the instruction-following checkers cannot be imported ({e}): run `bash setup.sh` "
                 "(requirements.txt pins if-verifiable)") from None


def known_kinds() -> frozenset[str]:
  return frozenset(INSTRUCTION_DICT)


def check(response: str, reference: Mapping[str, Any]) -> list[bool]:
  """Strict pass of each instruction, in the prompt's order."""
  ids = list(reference["instruction_id_list"])
  unknown = sorted(set(ids) - set(INSTRUCTION_DICT))
  if unknown:
    raise BarError(f"instruction kinds {unknown} are not in if-verifiable's IFBench registry: check the data or "
                   "the pinned if-verifiable version")
  results, _ = evaluate_instructions(response, ids, list(reference["kwargs"]), reference["prompt"], INSTRUCTION_DICT)
  return [r.strict_pass for r in results] if results else [False] * len(ids)  # empty response: none met


def follows_all(response: str, reference: Mapping[str, Any]) -> float:
  return float(all(check(response, reference)))
