"""No evaluation item of any domain has a twin in that domain's training data, exactly or after normalisation (case,
spacing, punctuation), over the real packaged data; and the scored items are distinct from each other."""
import collections

from bar_jax.data import capability
from bar_jax.data.sources import normalised


def _prompt(messages):
  return "\n".join(m["content"] for m in messages if m["role"] == "user")


def _eval_keys(item):
  if item["kind"] == "nll_text":
    return item["text"]
  if item["kind"] == "nll_chat":
    return _prompt(item["messages"]) + "\n" + item["messages"][-1]["content"]
  return _prompt(item["messages"])


def _train_keys(domain):
  chats = domain.chat_examples("train")
  if domain.metric.name == "nll":
    keys = {_prompt(m) + "\n" + m[-1]["content"] for m in chats}
    return keys | set(domain.text_examples("train"))
  return {_prompt(m) for m in chats}


def test_no_eval_item_has_a_train_twin_in_any_domain():
  problems = {}
  for d in capability.resolve("all"):  # the built-in capabilities and evaluation sets
    train = set() if d.eval_only else _train_keys(d)  # an evaluation set: no training data, no repeats
    train_norm = {normalised(k) for k in train}
    items = d.eval_items()
    keys = [_eval_keys(it) for it in items]
    exact = [k[:80] for k in keys if k in train]
    norm = [k[:80] for k in keys if normalised(k) in train_norm]
    repeated = [k[:80] for k, c in collections.Counter(normalised(k) for k in keys).items() if c > 1]
    if exact or norm or repeated:
      problems[d.name] = {"exact": exact[:3], "normalised": norm[:3], "repeated_in_eval": repeated[:3],
                          "counts": (len(exact), len(norm), len(repeated))}
  assert not problems, problems


def test_normalised_keys_catch_what_exact_keys_miss():
  """The check above can fail: two BFCL questions that differ only in spacing and case are one question."""
  a = "What is the area of a triangle with base 10 and height 5?"
  b = "what is the area of a triangle  with base 10, and height 5"
  assert a != b and normalised(a) == normalised(b)
