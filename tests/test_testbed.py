"""The many-capability testbed: reasoning-gym tasks as capabilities (bar_jax/data/sources/rgym_tasks.py), the
greedy_match metric (teacher-forced greedy match, evals/menu.py) against real greedy decoding, and
configs/bar_testbed.py."""
import jax
import numpy as np
import pytest

from bar_jax.data import capability, domains
from bar_jax.data.sources import normalised, rgym_tasks
from bar_jax.errors import BarError
from bar_jax.evals import menu, runner
from bar_jax.model import config as config_lib
from bar_jax.model import generate as gen
from bar_jax.model import transformer
from configs.bar_testbed import get_config, spec_path

SEQ_LEN = 128     # configs/bar_testbed.py's SFT rows: a whole conversation must fit (ids <= SEQ_LEN + 1)
MAX_ANSWER = 16   # answer tokens, the end-of-turn token not counted


def _ids(tokenizer, texts):
  return [e.ids for e in tokenizer.tok.encode_batch(texts, add_special_tokens=False)]


def test_testbed_specs_load_split_and_fit_their_budgets(smollm2_tokenizer):
  """Every task's spec loads; >= 200 held-out and >= 2000 training items, disjoint by the split key; every
  conversation fits the SFT rows, every answer <= 16 tokens, and every held-out prompt tokenises as a prefix of its
  conversation (so greedy_match equals greedy decoding of the reference tokens)."""
  tok = smollm2_tokenizer
  assert len(rgym_tasks.TESTBED) == 16 and len(rgym_tasks.TASKS) > 16
  fingerprints = set()
  for task in rgym_tasks.TASKS:
    cap = capability.get(spec_path(task))
    assert cap.name == task and cap.metric.name == "greedy_match"
    assert cap.files[f"reasoning_gym:{task}"] == rgym_tasks.identity(task)  # the task's row fingerprints it
    fingerprints.add(cap.fingerprint)
    train, evals = cap.chat_examples("train"), cap.eval_items()
    assert len(evals) >= 200 and len(train) >= 2000, task
    assert len({it["id"] for it in evals}) == len(evals)
    train_keys = {normalised(m[-2]["content"]) for m in train}
    assert not train_keys & {normalised(it["messages"][-1]["content"]) for it in evals}, task
    # lengths over every held-out item and the first 1000 training ones (experiments/testbed_tasks.py: all)
    convs = [it["messages"] + [{"role": "assistant", "content": it["reference"]}] for it in evals] + train[:1000]
    rows = _ids(tok, [tok.render_chat_text(c)[0] for c in convs])
    answers = _ids(tok, [c[-1]["content"] for c in convs])
    assert max(map(len, rows)) <= SEQ_LEN + 1 and max(map(len, answers)) <= MAX_ANSWER, task
    prompts = _ids(tok, [tok.render_chat_text(it["messages"], add_generation_prompt=True)[0] for it in evals])
    assert all(r[:len(p)] == p for r, p in zip(rows, prompts)), task
    rl = cap.rl_items("train")
    assert rl[0]["reference"] == train[0][-1]["content"] and rl[0]["messages"] == train[0][:-1]
  assert len(fingerprints) == len(rgym_tasks.TASKS)
  with pytest.raises(BarError, match="unknown testbed task 'nope'"):
    domains.source("reasoning_gym:nope")


_DRAWS = """
import hashlib, json, reasoning_gym
from bar_jax.data.sources import rgym_tasks
out = {}
for task, (generator, options) in rgym_tasks.TASKS.items():
  ds = reasoning_gym.create_dataset(generator, size=100, seed=rgym_tasks.SEED, **options)
  out[task] = hashlib.sha256(json.dumps([(x["question"], str(x["answer"])) for x in ds]).encode()).hexdigest()
print(json.dumps(out))
"""


def test_testbed_items_do_not_depend_on_the_hash_seed():
  """Every task's generator draws the same items under two PYTHONHASHSEEDs (set order inside a generator would
  move items across the split from one process to the next: isomorphic_strings and ransom_note did)."""
  import json
  import os
  import subprocess
  import sys
  runs = [subprocess.Popen([sys.executable, "-c", _DRAWS], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(seed), JAX_PLATFORMS="cpu")) for seed in (1, 2)]
  first, second = (json.loads(r.communicate(timeout=120)[0].strip().splitlines()[-1]) for r in runs)
  assert sorted(first) == sorted(rgym_tasks.TASKS)
  assert [t for t in first if first[t] != second[t]] == []


def _forced(params, cfg, tok, prompts):
  """(prompt index, k, params'): the untied head's columns of end-of-turn and of the (k+1)-th greedy token swapped,
  so the model's greedy reply is exactly its first k tokens and then end-of-turn (no earlier argmax moves)."""
  outs = gen.generate(params, cfg, prompts, max_new_tokens=6, eos_ids=tok.eos_ids, pad_id=tok.pad_id)
  for i, g in enumerate(outs):
    for k in range(len(g) - 1, 1, -1):  # the longest such reply
      head = g[:k]
      if g[k] in head or min(g[:k + 1]) < 3 or tok.encode(tok.decode(head)) != head:  # no specials, round-trips
        continue
      kernel = np.array(params["lm_head"]["kernel"])
      kernel[:, [tok.eot_id, g[k]]] = kernel[:, [g[k], tok.eot_id]]
      return i, k, dict(params, lm_head={"kernel": kernel}), head
  raise AssertionError("no greedy reply to force (random models tend to repeat one token): change the seed")


def test_greedy_match_equals_greedy_generation_item_by_item(byte_tokenizer):
  """greedy_match's per-item outcome is exactly "greedy decoding (bar_jax.model.generate, KV cache) produces the
  reference tokens and then end-of-turn", on a tiny random model: items the model is forced to get right (its own
  greedy reply, end-of-turn forced by swapping two head columns), near misses (one token short, one token more), and
  real testbed items it gets wrong. Each item's answer NLL equals a plain forward's log-softmax."""
  tok = byte_tokenizer
  cfg = config_lib.tiny(vocab_size=tok.vocab_size, max_seq_len=256, tie_embeddings=False)
  params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(1)))
  questions = ["Spell this word backward (example: sun -> nus): gallium", "How many 1 bits are in 1179?",
               "Find the GCD of 15, 5.", "Reverse this list of words: light, was, a"]
  msgs = [[{"role": "user", "content": q}] for q in questions]
  i, k, params, head = _forced(params, cfg, tok, [tok.render_chat(m, add_generation_prompt=True)[0] for m in msgs])
  text = tok.decode(head)
  items = [{"messages": msgs[i], "reference": text},                                   # right
           {"messages": msgs[i], "reference": tok.decode(head[:-1])},                  # stops one token early
           {"messages": msgs[i], "reference": text + "x"},                             # one token longer
           {"messages": msgs[i], "reference": tok.decode(head[:-1] + [head[-1] + 1])}]  # last token wrong
  items += [{"messages": m, "reference": r} for m, r in zip(msgs, ["muillag", "6", "5", "a, was, light"])]
  items = [dict(it, id=str(n), kind="exact_match") for n, it in enumerate(items)]
  res = runner._greedy_domain(params, cfg, tok, items, batch_size=2, seq_len=128, mesh=None)

  prompts = [tok.render_chat(it["messages"], add_generation_prompt=True)[0] for it in items]
  refs = [tok.encode(it["reference"]) for it in items]
  outs = gen.generate(params, cfg, prompts, max_new_tokens=[len(r) + 2 for r in refs], eos_ids=tok.eos_ids,
                      pad_id=tok.pad_id)
  decoded_ok = [list(o) == r + [tok.eot_id] for o, r in zip(outs, refs)]
  got = [r["ok"] for r in res["items"]]
  assert got == decoded_ok and got[:4] == [True, False, False, False] and not any(got[4:])
  assert res["n"] == len(items) and res["value"] == pytest.approx(100.0 / len(items))
  assert res["ci"][0] < res["value"] < res["ci"][1] and res["prompt_not_prefix"] == 0

  # NLL of answer + end-of-turn from one plain forward, each item alone in its row (right padding: causal)
  seqs = [p + r + [tok.eot_id] for p, r in zip(prompts, refs)]
  width = max(map(len, seqs))
  logits, _ = transformer.forward(params, np.asarray([q + [tok.pad_id] * (width - len(q)) for q in seqs]), cfg)
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
  for b, (ids, p, rec) in enumerate(zip(seqs, prompts, res["items"])):
    want = -sum(logp[b, t - 1, ids[t]] for t in range(len(p), len(ids)))
    assert rec["tokens"] == len(ids) - len(p)
    np.testing.assert_allclose(rec["nll_sum"], want, rtol=1e-4)


def test_greedy_match_through_evaluate_model_and_its_reward():
  """A testbed domain evaluated by evaluate_model takes the greedy_match path (the tiny model with the real
  tokenizer): per-item outcomes by the items' ids, a rate with its interval, answer NLLs; its reward is the
  generative form (the reply equals the answer)."""
  from bar_jax import evals
  from bar_jax.io import models
  model = models.load_model("tiny")
  rep = evals.evaluate_model(model.params, model.cfg, model.tokenizer, [spec_path("gcd")], n_per_domain=6,
                             nll_seq_len=128, nll_batch_rows=2)
  res = rep["domains"]["gcd"]
  ids = [it["id"] for it in capability.get(spec_path("gcd")).eval_items()[:6]]
  assert res["metric"] == "greedy_match" and [it["id"] for it in res["items"]] == ids
  assert res["n"] == 6 and res["value"] == 0.0 and len(res["ci"]) == 2 and np.isfinite(res["nll"])
  assert all(it["tokens"] >= 2 and it["nll_sum"] > 0 for it in res["items"])
  metric = menu.build("greedy_match")
  assert metric.mode == "greedy" and metric.reward(" 5\n", {"reference": "5"}) == 1.0
  assert metric.reward("5.", {"reference": "5"}) == 0.0 and metric.reward("yes", {"reference": "Yes"}) == 0.0


def test_bar_testbed_config_plans_the_first_n_capabilities(tmp_path):
  """configs/bar_testbed.py:n=8 plans base, 8 branches (SFT only, 50 steps of 8 x 128, LoRA), merge, router and
  the eval rows, every override a key of its stage config; n outside 2..16 and unknown experts are refused."""
  from bar_jax.stages import pipeline
  c = get_config("n=8")
  assert c.stage == "pipeline" and c.base == "smollm2"
  assert c.domains == [spec_path(t) for t in rgym_tasks.TESTBED[:8]]
  assert c.eval.domains.split(",") == list(c.domains) and c.eval.n_per_domain == 200
  steps = pipeline.plan(c, str(tmp_path))
  branches = [s for s in steps if s.kind == "branch"]
  assert [s.outdir.rsplit("branch_", 1)[1] for s in branches] == list(rgym_tasks.TESTBED[:8])
  bc = branches[0].config
  assert bc.expert_kind == "lora" and list(bc.phase_order) == ["sft"] and bc.capability == spec_path(
      "letter_counting")
  assert (bc.phases.sft.steps, bc.phases.sft.batch_size, bc.phases.sft.data.seq_len) == (50, 8, 128)
  assert bc.phases.sft.opt.lr == 1e-3 and bc.general_ratio == 0.25
  assert [s.kind for s in steps].count("eval") == 1 + 8 + 2  # base, branches, merged before router, bar
  ffn = pipeline.branch_config(get_config("n=2,expert=ffn"), spec_path("gcd"), "base")
  assert ffn.expert_kind == "ffn" and ffn.phases.sft.opt.lr == 5e-4
  tiny = pipeline.plan(get_config("n=2,tiny"), str(tmp_path / "tiny"))
  assert tiny[0].config.base == "tiny" and [s.config.phases.sft.steps for s in tiny if s.kind == "branch"] == [2, 2]
  for bad in ("n=1", "n=17", "expert=moe"):
    with pytest.raises(ValueError):
      get_config(bad)


def test_call_greedy_scores_the_target_call_item_by_item_and_grows_its_rows(byte_tokenizer):
  """Tool use's call_greedy takes the greedy_match path with the item's `target` (the canonical call) as the
  answer, not its BFCL ground truth: on a tiny random model forced to reply with a known text, an item whose target
  is that text is right whatever its reference, a near miss is wrong, and each outcome equals greedy decoding of
  that item alone. Rows shorter than a conversation grow to hold it (none dropped, the same outcomes and NLLs);
  without a target a BFCL ground truth is scored as its canonical call; the reward stays BFCL's AST match."""
  from bar_jax.data.sources import bfcl
  tok = byte_tokenizer
  cfg = config_lib.tiny(vocab_size=tok.vocab_size, max_seq_len=256, tie_embeddings=False)
  params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(1)))
  msgs = [[{"role": "user", "content": q}] for q in ["Call area for base 10.", "What is the weather in Rome?",
                                                      "Find the GCD of 15, 5.", "Sum 1 and 2 please."]]
  i, k, params, head = _forced(params, cfg, tok, [tok.render_chat(m, add_generation_prompt=True)[0] for m in msgs])
  text = tok.decode(head)
  gt = {"area": {"base": [10], "height": ["", 5]}}
  items = [{"messages": msgs[i], "reference": gt, "target": text},                 # right: the target is decoded
           {"messages": msgs[i], "reference": gt, "target": text + "]"},           # one token more: wrong
           {"messages": msgs[i], "reference": gt}]                                 # no target: the canonical call
  items = [dict(it, id=str(n), kind="call_match") for n, it in enumerate(items)]
  assert runner.answer_text(items[2]) == bfcl.canonical_call(gt) == "[area(base=10)]"
  res = runner._greedy_domain(params, cfg, tok, items, batch_size=2, seq_len=128, mesh=None)
  prompts = [tok.render_chat(it["messages"], add_generation_prompt=True)[0] for it in items]
  refs = [tok.encode(runner.answer_text(it)) for it in items]
  outs = [gen.generate(params, cfg, [p], max_new_tokens=len(r) + 2, eos_ids=tok.eos_ids, pad_id=tok.pad_id)[0]
          for p, r in zip(prompts, refs)]  # one item at a time: no batching shared with the forward
  decoded_ok = [list(o) == r + [tok.eot_id] for o, r in zip(outs, refs)]
  assert [r["ok"] for r in res["items"]] == decoded_ok == [True, False, False]
  short = runner._greedy_domain(params, cfg, tok, items, batch_size=2, seq_len=16, mesh=None)
  longest = max(len(tok.render_chat(it["messages"] + [{"role": "assistant", "content": runner.answer_text(it)}])[0])
                for it in items)
  assert 16 < longest <= short["seq_len"] and short["dropped_too_long"] == 0 and res["seq_len"] == 128
  assert [r["ok"] for r in short["items"]] == decoded_ok
  np.testing.assert_allclose([r["nll_sum"] for r in short["items"]], [r["nll_sum"] for r in res["items"]], rtol=1e-5)
  metric = menu.build("call_greedy")
  assert metric.mode == "greedy" and metric.name == "call_greedy"
  assert metric.reward("[area(base=10)]", {"reference": gt}) == 1.0
  assert metric.reward("[area(base=10, height=5)]", {"reference": gt}) == 1.0  # AST-equivalent: the reward takes it
  assert metric.reward("[area(base=11)]", {"reference": gt}) == 0.0
