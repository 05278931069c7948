"""The lm-eval adapter: its log-likelihoods equal bar_jax's own packed NLL on the same tokens, and a local task (a
task YAML and local JSONL files, offline) runs end to end through lm_eval.simple_evaluate with all three request
kinds."""
import json

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional test dependency (requirements-test.txt)")

from bar_jax.evals import lm_eval_model, runner  # noqa: E402


@pytest.fixture(scope="module")
def lm():
  from bar_jax.io import gguf
  from bar_jax.model import config as config_lib
  from bar_jax.model import transformer
  tok = gguf.load_tokenizer()
  cfg = config_lib.tiny(vocab_size=tok.vocab_size, max_seq_len=64, tie_embeddings=True)
  params = transformer.init_params(cfg, jax.random.key(0))
  return lm_eval_model.BarJaxLM(loaded=(cfg, params, tok), batch_size=4, max_gen_toks=6)


def test_load_is_the_stages_model_loader():
  """lm-eval's load goes through bar_jax/io/models.py: the same model (config and every leaf) as the stages load."""
  from bar_jax import fingerprints
  from bar_jax.io import models
  cfg, params, tok = lm_eval_model.load("tiny:3")
  model = models.load_model("tiny:3")
  assert cfg == model.cfg and tok.vocab_size == model.tokenizer.vocab_size
  assert fingerprints.fingerprint(params) == model.manifest["fingerprint"]


class _Req:
  def __init__(self, *args):
    self.args = args


def _own_nll(lm, inputs, targets, mask):
  rows = [{"inputs": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32),
           "mask": np.asarray(mask, np.float32)}]
  sums, counts = runner._rows_nll(lm.params, lm.cfg, rows, batch_size=1, seq_len=64, pad_id=lm.tokenizer.pad_id,
                                  mesh=None)
  return float(sums[0]), float(counts[0])


TEXT = "The quick brown fox jumps over the lazy dog. Python's sorted() returns a new list."


def test_rolling_loglikelihood_equals_bar_jax_nll(lm):
  ids = lm.tokenizer.encode(TEXT)
  assert len(ids) < lm.max_length  # one window: the first token conditioned on the prefix token
  (ll,) = lm.loglikelihood_rolling([_Req(TEXT)])
  nll, count = _own_nll(lm, [lm.prefix_id] + ids[:-1], ids, np.ones(len(ids)))
  assert count == len(ids)
  # float32 log-softmax over a 49k vocabulary, ~20 tokens summed: the two paths differ by rounding (~1e-5 relative).
  assert ll == pytest.approx(-nll, rel=1e-4)
  # Longer than one window: lm-eval's disjoint windows score every token exactly once, each with up to max_length
  # tokens of context; the sum equals bar_jax's NLL over the same windows.
  from lm_eval import utils
  long_text = " ".join([TEXT] * 8)
  long_ids = lm.tokenizer.encode(long_text)
  assert len(long_ids) > 2 * lm.max_length
  (ll_long,) = lm.loglikelihood_rolling([_Req(long_text)])
  windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
      token_list=long_ids, prefix_token=lm.prefix_id, max_seq_len=lm.max_length, context_len=1)]
  assert sum(len(t) for _, t in windows) == len(long_ids) and len(windows) >= 2
  ref = 0.0
  for ctx, tgt in windows:
    seq = list(ctx) + list(tgt)
    mask = np.zeros(len(seq) - 1)
    mask[-len(tgt):] = 1
    ref += _own_nll(lm, seq[:-1], seq[1:], mask)[0]
  assert ll_long == pytest.approx(-ref, rel=1e-4)


def test_loglikelihood_of_a_continuation_equals_bar_jax_nll(lm):
  context, continuation = "Question: what is 2 + 3?\nAnswer:", " 5"
  (ll, greedy), = lm.loglikelihood([_Req(context, continuation)])
  ctx, cont = lm.tokenizer.encode(context), lm.tokenizer.encode(continuation)
  seq = ctx + cont
  mask = np.zeros(len(seq) - 1)
  mask[-len(cont):] = 1
  nll, count = _own_nll(lm, seq[:-1], seq[1:], mask)
  assert count == len(cont) and ll == pytest.approx(-nll, rel=1e-4)
  assert isinstance(greedy, bool)
  # A continuation the model itself would produce greedily is reported as greedy.
  first = lm.generate_until([_Req(context, {"until": ["\n\n"], "max_gen_toks": 1})])[0]
  if first:
    assert lm.loglikelihood([_Req(context, first)])[0][1] in (True, False)


def test_local_task_runs_offline_with_every_request_kind(lm, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  docs = [{"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "label": 0,
           "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (2, 2)]]
  data = tmp_path / "arith.jsonl"
  data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
  common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
  (tmp_path / "arith_mc.yaml").write_text(
      "task: bar_arith_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: \"{{question}}\\nAnswer:\"\n"
      "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
  (tmp_path / "arith_gen.yaml").write_text(
      "task: bar_arith_gen\n" + common + "output_type: generate_until\ndoc_to_text: \"{{question}}\\nAnswer:\"\n"
      "doc_to_target: answer\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n"
      "metric_list:\n  - metric: exact_match\n")
  (tmp_path / "arith_ppl.yaml").write_text(
      "task: bar_arith_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: question\n"
      "doc_to_target: question\nmetric_list:\n  - metric: word_perplexity\n")
  from lm_eval.tasks import TaskManager
  out = lm_eval.simple_evaluate(model=lm, tasks=["bar_arith_mc", "bar_arith_gen", "bar_arith_ppl"],
                                task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
  res = out["results"]
  assert 0.0 <= res["bar_arith_mc"]["acc,none"] <= 1.0
  assert 0.0 <= res["bar_arith_gen"]["exact_match,none"] <= 1.0
  assert res["bar_arith_ppl"]["word_perplexity,none"] > 1.0
  # The harness's per-choice log-likelihoods are the adapter's, which are bar_jax's own NLL (tested above).
  sample = out["samples"]["bar_arith_mc"][0]
  doc = sample["doc"]
  ours = lm.loglikelihood([_Req(f"{doc['question']}\nAnswer:", " " + c) for c in doc["choices"]])
  theirs = [r[0][0] for r in sample["resps"]]
  np.testing.assert_allclose(theirs, [o[0] for o in ours], rtol=1e-6)
