"""The testbed tasks: one capability per reasoning-gym generator (Apache-2.0), read through its public
`create_dataset` API, for BAR experiments with many experts that take minutes per branch on a CPU.

A capability spec names one with `data.source = "reasoning_gym:<task>"` (bar_jax.data.domains.source; the specs are
configs/capabilities/testbed/<task>.py). The 16 tasks, in the testbed's order (configs/bar_testbed.py takes the
first n): letter_counting, word_sequence_reversal, syllogism, spell_backward, family_relationships, gcd,
calendar_arithmetic, count_bits, time_intervals, complex_arithmetic, fraction_simplification, base_conversion,
leg_counting, lcm, count_primes, simple_equations; spares: basic_arithmetic, simple_geometry, bitwise_arithmetic.

How they were chosen (experiments/testbed_tasks.py measures it: experiments/results/testbed_tasks.md): among
reasoning-gym's generators, those whose answer is one deterministic short string (exact match is the right score:
no task with several right answers, or a tolerance), with options that keep the rendered prompt at 40-120 SmolLM2
tokens and the answer at <= 16, so every SFT conversation fits a row of 128 tokens; whose base score is 0 (the
bare answer is the SFT target, so the base fails on format as well as content); with a prompt surface of their own
(a router can tell them apart); whose items do not change with PYTHONHASHSEED; and with enough distinct questions
for N_EVAL held-out and N_TRAIN training items. The first ones have small answer spaces (Yes/No, one-word relations,
small counts), where a few dozen SFT steps show gains;
the later ones need more arithmetic. Left out: isomorphic_strings and ransom_note (their items change with
PYTHONHASHSEED: set iteration order inside the generators; ransom_note's base also scored 39.5%), word_sorting and
letter_jumble (instructions that make rows of up to 146 and 153 tokens), aiw (a 144-token question type, not
selectable by options), caesar_cipher, number_sequence and sentence_reordering (too few distinct questions with
short answers), prime_factorization, power_function and number_sorting (long or tolerance-scored answers).

Items: the generator's items in index order (seed SEED), deduplicated by the normalised question and split by its
hash (`is_eval_normalised`, EVAL_PCT), until N_EVAL held-out and N_TRAIN training items are collected (a generator
whose space is too small for that within MAX_DRAWS draws is one error line). A task is one generator, so its
held-out items are a uniform sample in any prefix; each item's group is the task name. The split and the sizes
depend only on the task's row of TASKS and the reasoning-gym version (`identity`, in the capability's fingerprint),
so adding a task changes no other task's data.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json

from bar_jax.errors import BarError
from bar_jax.data.sources import SETUP_HINT, is_eval_normalised, normalised

LICENSE = "reasoning-gym: Apache-2.0"
SEED = 20261
EVAL_PCT = 10      # of each task's distinct questions held out (by hash): a few thousand draws give N_EVAL
N_EVAL = 300       # held-out items per task (the testbed evaluates the first 200)
N_TRAIN = 3000     # training items per task (a 50-step SFT reads a few hundred)
MAX_DRAWS = 30000  # generator indices read at most per task

# task -> (generator, options). In the testbed's order: configs/bar_testbed.py takes the first n. Options keep
# prompts and answers short; a small answer space (Yes/No, one-word relations, small counts) shows early gains.
TASKS: dict[str, tuple[str, dict]] = {
    "letter_counting": ("letter_counting", dict(min_words=3, max_words=8)),
    "word_sequence_reversal": ("word_sequence_reversal", dict(min_words=3, max_words=5)),
    "syllogism": ("syllogism", {}),
    "spell_backward": ("spell_backward", dict(min_word_len=3, max_word_len=7)),
    "family_relationships": ("family_relationships", dict(min_family_size=4, max_family_size=5)),
    "gcd": ("gcd", dict(max_value=150)),
    "calendar_arithmetic": ("calendar_arithmetic", {}),
    "count_bits": ("count_bits", dict(max_n=65535)),
    "time_intervals": ("time_intervals", dict(task_types=["time"])),
    "complex_arithmetic": ("complex_arithmetic", dict(min_real=-9, max_real=9, min_imag=-9, max_imag=9,
                                                      operations=("+", "-"), operations_weights=[0.5, 0.5])),
    "fraction_simplification": ("fraction_simplification", dict(max_value=100, max_factor=10, styles=("plain",))),
    "base_conversion": ("base_conversion", dict(min_value=0, max_value=255)),
    "leg_counting": ("leg_counting", dict(min_animals=1, max_animals=3, max_instances=9)),
    "lcm": ("lcm", dict(max_value=99)),
    "count_primes": ("count_primes", dict(max_n=500)),
    "simple_equations": ("simple_equations", dict(min_terms=2, max_terms=2, max_value=20)),
    # spares: beyond the first 16 (configs/bar_testbed.py n <= 16); swap one in with --config.domains
    "basic_arithmetic": ("basic_arithmetic", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2,
                                                  operators=("+", "-", "*"), allow_parentheses=False)),
    "simple_geometry": ("simple_geometry", {}),
    "bitwise_arithmetic": ("bitwise_arithmetic", dict(difficulty=1)),
}
TESTBED = tuple(TASKS)[:16]  # the testbed proper; the rest are spares


def check_task(task: str) -> str:
  if task not in TASKS:
    raise BarError(f"unknown testbed task {task!r}: use reasoning_gym:<task> with one of {', '.join(TASKS)}")
  return task


def identity(task: str) -> str:
  """What fixes the task's items: its row, the split and sizes, and the reasoning-gym version (fingerprints it)."""
  generator, options = TASKS[check_task(task)]
  try:
    version = importlib.metadata.version("reasoning-gym")
  except importlib.metadata.PackageNotFoundError:
    version = "missing"
  row = {"generator": generator, "options": options, "seed": SEED, "eval_pct": EVAL_PCT, "n_eval": N_EVAL,
         "n_train": N_TRAIN, "reasoning-gym": version}
  return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def items(task: str) -> dict[str, tuple[dict, ...]]:
  """{"train": N_TRAIN items, "eval": N_EVAL items}, each {question, answer, id}, in the generator's order."""
  generator, options = TASKS[check_task(task)]
  try:
    import reasoning_gym
  except ImportError:
    raise BarError(f"reasoning-gym is not installed: {SETUP_HINT}") from None
  ds = reasoning_gym.create_dataset(generator, size=MAX_DRAWS, seed=SEED, **options)  # items are made per index
  want = {"train": N_TRAIN, "eval": N_EVAL}
  out: dict[str, list[dict]] = {"train": [], "eval": []}
  seen = set()
  for i in range(MAX_DRAWS):
    item = ds[i]
    q, key = item["question"].strip(), normalised(item["question"])
    if key in seen:  # also twins that differ only in case, spacing or punctuation
      continue
    seen.add(key)
    side = "eval" if is_eval_normalised(q, EVAL_PCT) else "train"
    if len(out[side]) < want[side]:
      out[side].append({"question": q, "answer": str(item["answer"]).strip(),
                        "id": hashlib.sha256(key.encode()).hexdigest()[:12]})
    if all(len(out[s]) == want[s] for s in want):
      return {s: tuple(v) for s, v in out.items()}
  raise BarError(f"testbed task {task!r} gave {len(out['train'])} training and {len(out['eval'])} held-out distinct "
                 f"questions in {MAX_DRAWS} draws, short of {N_TRAIN} and {N_EVAL}: widen its options in "
                 "bar_jax/data/sources/rgym_tasks.py TASKS")
