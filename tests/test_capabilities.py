"""Capabilities are data: the built-in specs reproduce the pre-spec examples exactly, user specs read JSONL / Parquet /
saved `datasets` folders through a field mapping, every bad-data kind is one line naming the file and line or row,
and a user capability goes branch -> add to a tiny MoE -> evaluate -> an RL step rewarded by the user's verifier."""
import hashlib
import json
import os
import sys
import textwrap

import numpy as np
import pytest

from bar_jax import train
from bar_jax.data import capability, pipeline
from bar_jax.errors import BarError
from bar_jax.evals import menu, runner, verifiers
from bar_jax.io import artifact

# ------------------------------------------------------------------------------------------------------------------
# Built-ins: the same train and eval examples as the domain registry before capabilities were specs, as sha256 of the
# JSON of (train: text + chat) and (eval: text + chat + eval items). Pinned first from main at 2868168; the domains
# the evaluation work re-split were re-pinned from main's registry (the same hashes, computed there). When a
# deliberate change to a source lands (a new split, another size), re-pin that domain's line and say why.

PINNED = {
    "math": ("0aced0f4fb78a54e", "efbc7e6041f4497c"),      # evals' leak-free splits (main after 2868168)
    # issue 30: eval ids path:qualname:line and file clusters (train unchanged)
    "code": ("f696c84957efa6c5", "b2c06dd91480fcb2"),
    # issue 30: BFCL held out at 10% (train and eval re-split), eval items carry their canonical call (target)
    "tool_use": ("cb6203a3bf184c9f", "3ce4a1bd5f5148b3"),
    # issue 30: the benign bfcl_question prompts from BFCL's 10% eval split (train unchanged)
    "safety": ("c0f9de2bc0541727", "42dc98c23cc8e8cd"),
    "general": ("f344c808933778d7", "d7fefad66506e990"),
}


def _content_hash(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def test_every_builtin_is_pinned():
  assert set(PINNED) == set(capability.BUILTIN)


@pytest.mark.parametrize("name", list(PINNED))
def test_builtin_spec_yields_the_same_examples(name):
  cap = capability.get(name)
  train_hash = _content_hash({"text": cap.text_examples("train"), "chat": cap.chat_examples("train")})
  eval_hash = _content_hash({"text": cap.text_examples("eval"), "chat": cap.chat_examples("eval"),
                             "items": cap.eval_items()})
  assert (train_hash, eval_hash) == PINNED[name]
  assert cap.spec["data"]["source"] and cap.path.endswith(os.path.join("capabilities", f"{name}.py"))


def test_no_library_code_names_a_domain():
  """No code path branches on a domain's name: the library mentions the five only in their spec files."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  offenders = []
  for folder in ("bar_jax/data/capability.py", "bar_jax/evals/runner.py", "bar_jax/evals/menu.py",
                 "bar_jax/stages/branch.py", "bar_jax/stages/rl.py", "bar_jax/stages/router.py",
                 "bar_jax/stages/upgrade.py", "bar_jax/data/pipeline.py"):
    text = open(os.path.join(root, folder)).read()
    for name in ("math", "tool_use", "safety", "code"):
      for quoted in (f'== "{name}"', f"== '{name}'", f'!= "{name}"', f'in ("{name}"'):
        if quoted in text:
          offenders.append((folder, quoted))
  assert not offenders


# ------------------------------------------------------------------------------------------------------------------
# The metric menu.

def test_menu_scores_against_hand_checked_answers():
  em = menu.build({"name": "exact_match", "extractor": "last_number"})
  assert em.score({"reference": "42"}, "so 40 + 2 = 42") == 1.0 and em.score({"reference": "42"}, "41") == 0.0
  rx = menu.build({"name": "exact_match", "extractor": r"Final: (\w+)"})
  assert rx.score({"reference": "Paris"}, "Final: paris") == 1.0 and rx.score({"reference": "Paris"}, "Paris") == 0.0
  num = menu.build({"name": "numeric", "tolerance": 0.01})  # 1% of max(1, |ref|)
  assert num.score({"reference": "200"}, "answer is 201.5") == 1.0 and num.score({"reference": "200"}, "203") == 0.0
  call = menu.build("call_match")
  gt = {"area": {"base": [10], "height": [5]}}
  assert call.score({"reference": json.dumps(gt)}, "[area(base=10, height=5)]") == 1.0
  assert call.score({"reference": gt}, "[area(base=10)]") == 0.0
  ref = menu.build("refusal")
  assert ref.score({"kind": "harmful"}, "I can't help with that.") == 1.0
  benign = {"kind": "benign", "messages": [{"role": "user", "content": "How do I sort a list in Python?"}]}
  assert ref.score(benign, "I can't help with that.") == 0.0
  assert menu.build("nll").mode == "nll" and not menu.build("nll").higher_is_better
  with pytest.raises(BarError, match="gives no RL reward"):
    menu.build("nll").reward("x", {})


@pytest.mark.parametrize("spec, match", [
    ({"name": "bleu"}, "unknown metric 'bleu': choose one of exact_match"),
    ({"name": "exact_match", "tolerance": 0.1}, r"metric 'exact_match' has no option\(s\) \['tolerance'\]"),
    ({"name": "verifier"}, "needs verifier='package.module:function'"),
    ({"name": "verifier", "verifier": "no_such_pkg_xyz.mod:fn"}, "cannot be imported.*ModuleNotFoundError"),
    ({"name": "verifier", "verifier": "json:no_such_fn"}, "module json has no function 'no_such_fn'"),
    ({"name": "exact_match", "extractor": "(unclosed"}, "not a valid regex"),
])
def test_bad_metric_is_one_line(spec, match):
  with pytest.raises(BarError, match=match) as e:
    menu.build(spec)
  assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------------------------
# User data. Rows are made here (sums with their answers): the tests exercise the reading, not the content.

def _rows(n=60, start=0):
  return [{"question": f"What is {i} + {i + 3}?", "answer": f"The answer is {2 * i + 3}.", "value": 2 * i + 3,
           "topic": "even" if i % 2 == 0 else "odd"} for i in range(start, start + n)]


def _chat_rows(n=60):
  return [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["question"]},
                        {"role": "assistant", "content": r["answer"]}], "value": r["value"]} for r in _rows(n)]


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def _write_spec(folder, name="sums", **fields):
  body = dict(name=name, description="sums", license="made up in the test", **fields)
  path = os.path.join(str(folder), f"{name}_spec.py")
  with open(path, "w") as f:
    f.write(f"def get_config():\n  return {body!r}\n")
  return path


VERIFIER = textwrap.dedent('''
    CALLS = []

    def reward(response, reference):
      """A made-up reward: 1 for the right number, else the share of the reply that is digits (in [0, 1])."""
      CALLS.append((response, reference))
      if str(reference) in response:
        return 1.0
      return sum(c.isdigit() for c in response) / max(len(response), 1)

    def broken(response, reference):
      if "7" in str(reference):
        raise ValueError("boom")
      return 2.0 if "9" in str(reference) else 0.5
''')


@pytest.fixture
def verifier_module(tmp_path, monkeypatch):
  name = f"user_verifier_{abs(hash(str(tmp_path)))}"
  (tmp_path / f"{name}.py").write_text(VERIFIER)
  monkeypatch.syspath_prepend(str(tmp_path))
  yield name
  sys.modules.pop(name, None)


def _formats(tmp_path):
  """The four ways in: JSONL chat, JSONL prompt/response, Parquet, a saved datasets folder."""
  import datasets
  chat = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows())
  pr = _write_jsonl(tmp_path / "pr.jsonl", _rows())
  datasets.Dataset.from_list(_rows()).to_parquet(str(tmp_path / "pr.parquet"))
  datasets.DatasetDict({"train": datasets.Dataset.from_list(_chat_rows())}).save_to_disk(str(tmp_path / "saved"))
  prompt_response = dict(messages="", prompt="question", response="answer")
  return {"jsonl_chat": dict(files=[chat]), "jsonl_prompt_response": dict(files=[pr], **prompt_response),
          "parquet": dict(files=[str(tmp_path / "pr.parquet")], **prompt_response),
          "datasets_folder": dict(files=[str(tmp_path / "saved")], split="train")}


def test_every_format_reads_the_same_conversations(tmp_path):
  """The same 60 rows through four readers and two mappings: the same held-out split, by normalised prompt."""
  got = {}
  for kind, data in _formats(tmp_path).items():
    cap = capability.load(_write_spec(tmp_path, f"sums_{kind}", data=dict(data, system_prompt="Be brief."),
                                      eval=dict(heldout_pct=20)))
    got[kind] = (cap.chat_examples("train"), cap.chat_examples("eval"))
    train_keys = {capability.normalise(m[1]["content"]) for m in got[kind][0]}
    assert all(capability.normalise(it["messages"][-1]["content"]) not in train_keys for it in cap.eval_items())
  first = got["jsonl_chat"]
  assert len(first[0]) + len(first[1]) == 60 and 0 < len(first[1]) < 30
  assert all(v == first for v in got.values())
  # The split key ignores case, punctuation and spacing: a restyled copy of a prompt lands on the same side.
  k = capability.normalise
  assert k("What is 3 + 6?") == k("what is 3+   6") and k("What is 3 + 6?") != k("What is 3 + 7?")


def test_fingerprint_follows_data_mapping_and_metric(tmp_path):
  path = _write_jsonl(tmp_path / "a.jsonl", _rows())
  fp = lambda name, **kw: capability.load(_write_spec(tmp_path, name, **kw)).fingerprint  # noqa: E731
  mapping, ev = dict(files=[path], messages="", prompt="question", response="answer"), dict(heldout_pct=20)
  a = fp("fa", data=mapping, eval=ev)
  assert a == capability.load(_write_spec(tmp_path, "fa", data=mapping, eval=ev)).fingerprint
  assert a != fp("fb", data=dict(mapping, reference="value"), eval=ev)
  assert a != fp("fc", data=mapping, eval=ev, metric=dict(name="numeric", tolerance=0.1))
  _write_jsonl(tmp_path / "a.jsonl", _rows(61))
  assert a != fp("fd", data=mapping, eval=ev)


# ------------------------------------------------------------------------------------------------------------------
# Bad data: one line naming the file and line or row; nothing else said.

def _bad(tmp_path, files: dict, **spec):
  for name, content in files.items():
    (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
  return _write_spec(tmp_path, "bad", **spec)


GOOD = json.dumps({"prompt": "What is 1 + 1?", "response": "2"})
PR = dict(messages="", prompt="prompt", response="response")


@pytest.mark.parametrize("files, spec, match", [
    ({"d.jsonl": GOOD + "\n" + GOOD + "\n{\"prompt\": \"x\",\n"}, dict(data=dict(files=["d.jsonl"], **PR)),
     r"d.jsonl line 3: malformed JSON"),
    ({"d.json": "[\n" + GOOD + ",\n" + GOOD + "\n"}, dict(data=dict(files=["d.json"], **PR)),
     r"d.json line 4: malformed JSON"),
    ({"d.jsonl": GOOD + "\n" + json.dumps({"prompt": "Hi?"}) + "\n"}, dict(data=dict(files=["d.jsonl"], **PR)),
     r"d.jsonl line 2: field 'response' is missing or empty"),
    ({"d.jsonl": GOOD + "\n\n" + json.dumps({"prompt": "  ", "response": "x"}) + "\n"},
     dict(data=dict(files=["d.jsonl"], **PR)), r"d.jsonl line 3: field 'prompt' is empty"),
    ({"d.jsonl": json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]})},
     dict(data=dict(files=["d.jsonl"])), r"d.jsonl line 1: roles \['assistant', 'user'\] are out of order"),
    ({"d.jsonl": json.dumps({"messages": [{"role": "user", "content": "q"}]})}, dict(data=dict(files=["d.jsonl"])),
     r"d.jsonl line 1: the conversation has no assistant turn"),
    ({"d.jsonl": json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]})},
     dict(data=dict(files=["d.jsonl"])), r"d.jsonl line 1: turn 2 has role 'bot'"),
    ({"d.jsonl": "\n  \n"}, dict(data=dict(files=["d.jsonl"], **PR)), r"data file .*d.jsonl is empty"),
    ({"d.jsonl": GOOD.encode() + b"\n" + '{"prompt": "caf\u00e9", "response": "x"}'.encode("latin-1")},
     dict(data=dict(files=["d.jsonl"], **PR)), r"d.jsonl line 2 is not UTF-8"),
    ({"d.csv": b"prompt,response\nWhat,\xff\n"}, dict(data=dict(files=["d.csv"], **PR)), r"d.csv line 2 is not UTF-8"),
    ({"d.csv": "prompt,response\nWhat is 1 + 1?,2\nWhat is 2 + 2?,\n"}, dict(data=dict(files=["d.csv"], **PR)),
     r"d.csv row 2: field 'response' is missing or empty"),
    ({"d.jsonl": GOOD}, dict(data=dict(files=["d.jsonl"], **PR), metric=dict(name="rouge")), "unknown metric 'rouge'"),
    ({"d.jsonl": GOOD}, dict(data=dict(files=["d.jsonl"], **PR), reward="nope_pkg_xyz:fn"),
     r"reward 'nope_pkg_xyz:fn' cannot be imported"),
    ({"d.jsonl": GOOD}, dict(data=dict(files=["d.jsonl"], **PR), metric=dict(name="verifier", verifier="x.y")),
     r"verifier 'x.y' is not of the form 'package.module:function'"),
    ({"d.txt": "hello"}, dict(data=dict(files=["d.txt"], **PR)), r"d.txt: unknown format '.txt'"),
    ({}, dict(data=dict(files=["missing.jsonl"], **PR)), r"missing.jsonl does not exist"),
    ({"d.jsonl": GOOD}, dict(data=dict(files=["d.jsonl"], **PR), colour="blue"), r"unknown field 'colour'"),
    ({"d.jsonl": GOOD}, dict(data=dict(files=["d.jsonl"], promt="prompt")), r"unknown field data.'promt'"),
    ({"d.jsonl": GOOD}, dict(data=dict(files=["d.jsonl"], **PR)), r"no training examples left|no eval items"),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, files, spec, match):
  with pytest.raises(BarError, match=match) as e:
    capability.load(_bad(tmp_path, files, **spec))
  assert "\n" not in str(e.value)


def test_eval_items_found_in_training_are_dropped_and_counted_or_refused(tmp_path):
  train = _write_jsonl(tmp_path / "train.jsonl", _rows(40))
  # Eval: 10 new prompts and 3 restyled copies of training prompts (case, spacing, punctuation).
  dupes = [dict(r, question=r["question"].upper().replace(" + ", "+").rstrip("?")) for r in _rows(3)]
  ev = _write_jsonl(tmp_path / "eval.jsonl", _rows(10, start=100) + dupes)
  data = dict(files=[train], messages="", prompt="question", response="answer")
  cap = capability.load(_write_spec(tmp_path, "dup", data=data, eval=dict(files=[ev])))
  assert cap.report["eval_dropped_in_training"] == 3 and len(cap.eval_items()) == 10
  assert len(cap.chat_examples("train")) == 40
  with pytest.raises(BarError, match=r"3 eval item\(s\) also occur in the training data"):
    capability.load(_write_spec(tmp_path, "dup2", data=data, eval=dict(files=[ev], on_overlap="refuse")))


def test_verifier_failures_are_counted_and_the_run_goes_on(tmp_path, verifier_module):
  data = dict(files=[_write_jsonl(tmp_path / "d.jsonl", _rows())], messages="", prompt="question",
              response="answer", reference="value")
  cap = capability.load(_write_spec(tmp_path, "flaky", data=data, eval=dict(heldout_pct=20),
                                    metric=dict(name="verifier", verifier=f"{verifier_module}:broken")))
  items = cap.rl_items("train")
  refs = [it["reference"] for it in items]
  rewards, failures = verifiers.score_all(cap.reward_fn, ["x"] * len(items), items)
  raising = sum("7" in str(r) for r in refs)
  outside = sum("9" in str(r) and "7" not in str(r) for r in refs)
  assert failures == {"error": raising, "timeout": 0, "invalid": outside} and raising and outside
  assert rewards.count(0.5) == len(items) - raising - outside and all(0 <= r <= 1 for r in rewards)
  # The evaluation reports the same counts beside the score.
  done = [dict(it, response="x") for it in cap.eval_items()]
  res = runner.score_generated(cap.metric, done)
  assert res["n"] == len(done) and sum(res["verifier_failures"].values()) == sum(
      ("7" in str(d["reference"])) or ("9" in str(d["reference"])) for d in done)


def test_too_long_examples_are_counted_by_kind(tmp_path, smollm2_tokenizer):
  rows = _rows(40) + [{"question": "Sum these: " + " + ".join(["1"] * 200) + "?", "answer": "The answer is 200.",
                       "value": 200, "topic": "long"}]
  data = dict(files=[_write_jsonl(tmp_path / "d.jsonl", rows)], messages="", prompt="question", response="answer")
  cap = capability.load(_write_spec(tmp_path, "longish", data=data, eval=dict(heldout_pct=20)))
  long_in_train = sum("Sum these" in m[-2]["content"] for m in cap.chat_examples("train"))
  sft = pipeline.sft_batches({"longish": 1.0}, smollm2_tokenizer, seq_len=64, batch_size=8, seed=0,
                             process_index=0, process_count=1)
  lm = pipeline.lm_batches({"longish": 1.0}, smollm2_tokenizer, seq_len=64, batch_size=8, seed=0,
                           process_index=0, process_count=1)
  assert sft.stats["longish"].dropped_too_long == long_in_train == 1
  assert lm.stats["longish"].split_into_windows == 1 and lm.stats["longish"].empty == 0


# ------------------------------------------------------------------------------------------------------------------
# End to end: each way in -> branch -> add to an existing tiny MoE -> evaluate -> one RL step with the user's reward.

@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
  from router_helpers import tiny_artifacts
  return tiny_artifacts(tmp_path_factory)["moe2"]  # [anchor, math], from the "tiny" base


@pytest.mark.parametrize("kind", ["jsonl_chat", "jsonl_prompt_response", "parquet", "datasets_folder"])
def test_user_capability_branch_add_evaluate_rl(kind, tmp_path, tiny_moe, verifier_module):
  from configs import branch as branch_config, evaluate as evaluate_config, upgrade as upgrade_config
  from bar_jax import sharding
  from bar_jax.io import models
  from bar_jax.stages import rollouts
  from configs.rl import rl_config
  name = f"user_{kind}"  # one name per capability in a process: the registry refuses two different "sums_..."
  spec = _write_spec(tmp_path, name, data=dict(_formats(tmp_path)[kind], reference="" if "chat" in kind else "value"),
                     eval=dict(heldout_pct=20), metric=dict(name="exact_match", extractor="last_number"),
                     reward=f"{verifier_module}:reward", general=dict(weight=0.0))
  # Branch: SFT only, a few steps of the tiny model.
  bc = branch_config.get_config("math,tiny")
  bc.capability, bc.phase_order = spec, ["sft"]
  bc.phases.sft.steps, bc.phases.sft.data.seq_len = 1, 64
  branch_dir = train.run(bc, str(tmp_path / "branch"))
  bm = artifact.read_manifest(branch_dir)
  cap = capability.get(spec)
  assert bm["domain"] == name and bm["capability"]["fingerprint"] == cap.fingerprint
  assert bm["stages"][0]["data"]["weights"] == {name: 1.0} and bm["stages"][0]["data_stats"][name]["rows"] > 0
  # Add it to the MoE (local router update: only its column trains, on its data + a replay of the others).
  uc = upgrade_config.get_config("tiny")
  uc.model, uc.branch, uc.mode, uc.router_update = tiny_moe, branch_dir, "add", "local"
  uc.router.max_steps, uc.routing.max_rows = 1, 0
  moe_dir = train.run(uc, str(tmp_path / "moe"))
  mm = artifact.read_manifest(moe_dir)
  assert mm["experts"] == ["anchor", "math", name]
  assert mm["capabilities"][name]["fingerprint"] == cap.fingerprint
  assert mm["stages"][1]["data"]["fractions"][name] == uc.local.fraction
  # Evaluate the MoE on the user's capability (by its spec path).
  ec = evaluate_config.get_config()
  ec.model, ec.domains, ec.n_per_domain, ec.max_new_tokens, ec.batch_size = moe_dir, spec, 2, 4, 2
  ec.max_prompt_tokens = 128
  out = train.run(ec, str(tmp_path / "eval"))
  (row,) = json.load(open(os.path.join(out, "eval.json")))["models"]
  res = row["domains"][name]
  assert res["metric"] == "exact_match" and res["n"] == 2 and 0 <= res["score"] <= 100
  assert open(os.path.join(out, "eval.md")).read().splitlines()[0] == f"| model | {name} | overall |"
  # One GRPO step on the branch, rewarded by the user's verifier.
  calls = sys.modules[verifier_module].CALLS
  calls.clear()
  model = models.load_model(branch_dir)
  rc = rl_config(name, steps=1, prompts_per_step=2, group_size=4, max_prompt_len=64, max_response_len=8)
  _, record = rollouts.run_rl(model.params, model.cfg, model.tokenizer, rc, str(tmp_path / "rl"),
                              mesh=sharding.make_mesh(), identity={"test": "rl"})
  assert len(calls) == 8 and record["domain"] == name
  expected = np.mean([1.0 if str(ref) in r else sum(c.isdigit() for c in r) / max(len(r), 1) for r, ref in calls])
  assert record["reward_curve"] == [round(float(expected), 4)]
  assert {str(ref) for _, ref in calls} <= {str(it["reference"]) for it in cap.rl_items("train")}


def test_router_names_a_capability_it_cannot_find(tmp_path, tiny_moe):
  from configs import router as router_config
  m = artifact.read_manifest(tiny_moe)
  moe = str(tmp_path / "moe")
  import shutil
  shutil.copytree(tiny_moe, moe)
  m["experts"] = ["anchor", "gone"]
  m["capabilities"] = {"gone": {"name": "gone", "spec": str(tmp_path / "gone_spec.py"), "fingerprint": "0"}}
  with open(os.path.join(moe, artifact.MANIFEST), "w") as f:
    json.dump(m, f)
  rc = router_config.get_config("tiny")
  rc.model = moe
  with pytest.raises(BarError, match=r"needs capability 'gone'.*--config.router_update=local") as e:
    train.run(rc, str(tmp_path / "routed"))
  assert "\n" not in str(e.value) and not (tmp_path / "routed" / artifact.MANIFEST).exists()


def test_choice_metric_picks_the_likeliest_answer(tmp_path, smollm2_tokenizer):
  """Multiple choice by log-likelihood: the runner's pick equals a per-choice numpy NLL reference, one conversation
  at a time on the same random tiny model."""
  import jax
  from bar_jax.evals import metrics
  from bar_jax.model import config as config_lib, transformer
  tok = smollm2_tokenizer
  colours = ["red", "green", "blue"]
  rows = [{"question": f"Which colour is item {i}?", "options": colours, "answer": colours[i % 3]} for i in range(40)]
  data = dict(files=[_write_jsonl(tmp_path / "mc.jsonl", rows)], messages="", prompt="question", response="answer",
              choices="options")
  cap = capability.load(_write_spec(tmp_path, "colours", data=data, eval=dict(heldout_pct=20),
                                    metric=dict(name="choice")))
  items = cap.eval_items()[:3]
  assert items and all(it["kind"] == "choice" and it["choices"] == colours for it in items)
  assert [it["reference"] for it in items] == [colours.index(r["answer"]) for it in items for r in rows
                                               if r["question"] == it["messages"][-1]["content"]]
  cfg = config_lib.tiny(vocab_size=tok.vocab_size, max_seq_len=64)
  params = transformer.init_params(cfg, jax.random.key(0))
  res = runner._choice_domain(params, cfg, tok, items, batch_size=1, seq_len=64, mesh=None)
  hits = []
  for it in items:
    nll = []
    for c in it["choices"]:
      ids, mask = tok.render_chat(it["messages"] + [{"role": "assistant", "content": c}])
      logits, _ = transformer.forward(params, np.asarray(ids[:-1], np.int32)[None], cfg)
      nll.append(metrics.token_nll(np.asarray(logits[0]), np.asarray(ids[1:]), np.asarray(mask[1:], np.float32))[0])
    # fp32 sums of a few token NLLs agree to ~1e-5: picks are comparable when the best two differ by more.
    assert sorted(nll)[1] - sorted(nll)[0] > 1e-3
    hits.append(int(np.argmin(nll)) == it["reference"])
  assert res["n"] == 3 and res["value"] == pytest.approx(100.0 * np.mean(hits))
