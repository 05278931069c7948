"""Drift NLL: how far a model has moved from its base on text the base itself writes, outside every training mix.

The general NLL (held-out Python-docs prose) is in distribution for every branch (each mixes 25% Python-docs SFT),
so it falls with training. The drift set is the base's own greedy replies (DRIFT_TOKENS new tokens) to the IFBench
prompts (the instruction_following evaluation set: no training split, no domain's data), made once per base and
stored as a JSON artifact named by the base's fingerprint; every later model is scored by the per-token NLL of those
replies given their prompts (the assistant turn only, as SFT's loss mask; a reply cut at the budget still ends with
the end-of-turn token the chat template writes). The base scores its own greedy text; a model that drifts scores it
worse.

  drift_set(root, fingerprint, model_fn, ...)   the stored set for that base (made with model_fn() when missing)
  score(params, cfg, tokenizer, drift, ...)     the "drift" domain's result: nll, interval, per-item outcomes
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from bar_jax.errors import BarError
from bar_jax.model.config import Compute

SOURCE = "instruction_following"  # IFBench's test prompts, an evaluation set only
DRIFT_TOKENS = 128                # new tokens of each base reply
DRIFT_ITEMS = 128                 # prompts (stratified over IFBench's instruction families)
FORMAT = 1                        # the file's layout version


def path(root: str, fingerprint: str) -> str:
  """ROOT/drift_<first 16 hex digits of the base's fingerprint>.json."""
  if not fingerprint:
    raise BarError("the drift set is keyed by the base's fingerprint, and this base has none: load it from an "
                   "artifact dir or a packaged name")
  return os.path.join(root, f"drift_{fingerprint[:16]}.json")


def _settings(n: int, max_new_tokens: int, source_fingerprint: str) -> dict:
  return {"format": FORMAT, "source": SOURCE, "source_fingerprint": source_fingerprint, "n": n,
          "max_new_tokens": max_new_tokens}


def build(params, cfg, tokenizer, fingerprint: str, *, n: int = DRIFT_ITEMS, max_new_tokens: int = DRIFT_TOKENS,
          batch_size: int = 16, compute: Compute = Compute()) -> dict[str, Any]:
  """The base's greedy replies to the first n IFBench prompts that fit their prompt budget: {base_fingerprint,
  settings, items: [{id, group, kind: nll_chat, messages: prompt + reply, finished (the reply ended its turn)}],
  skipped_prompt_too_long, empty_replies}. Empty replies are left out (nothing to score) and counted."""
  from bar_jax.data import capability
  from bar_jax.evals import runner
  cap = capability.get(SOURCE)
  items = cap.eval_items()
  budget = runner.budgets(cap, tokenizer, items, max_new_tokens)
  prompt_budget = min(budget["prompt_tokens"], cfg.max_seq_len - max_new_tokens)
  kept, skipped = runner._take(items, n, prompt_budget, tokenizer)
  from bar_jax.model import generate as gen
  outs = gen.generate(params, cfg, [ids for _, ids in kept], max_new_tokens=max_new_tokens,
                      eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, batch_size=batch_size,
                      max_len=prompt_budget + max_new_tokens, compute=compute)
  out_items, empty = [], 0
  for (it, _), o in zip(kept, outs):
    reply = tokenizer.decode(o, skip_special_tokens=True).strip()
    if not reply:
      empty += 1
      continue
    out_items.append({"id": it["id"], "group": it.get("group", ""), "kind": "nll_chat",
                      "messages": it["messages"] + [{"role": "assistant", "content": reply}],
                      "finished": bool(len(o) and o[-1] in tokenizer.eos_ids)})
  return {"base_fingerprint": fingerprint, "settings": _settings(n, max_new_tokens, cap.fingerprint),
          "items": out_items, "skipped_prompt_too_long": skipped, "empty_replies": empty}


def drift_set(root: str, fingerprint: str, model_fn: Callable[[], tuple[Any, Any, Any, Compute]], *,
              n: int = DRIFT_ITEMS, max_new_tokens: int = DRIFT_TOKENS, batch_size: int = 16) -> dict[str, Any]:
  """The drift set of the base with this fingerprint: read from ROOT when a set with these settings is stored,
  else made from model_fn() -> (params, cfg, tokenizer, compute) and written (atomically) for every later model. A
  stored set of other settings is refused with one line (it is never overwritten)."""
  from bar_jax.data import capability
  from bar_jax.io import workdir as workdir_lib
  file = path(root, fingerprint)
  want = _settings(n, max_new_tokens, capability.get(SOURCE).fingerprint)
  if os.path.isfile(file):
    with open(file) as f:
      stored = json.load(f)
    if stored.get("base_fingerprint") != fingerprint or stored.get("settings") != want:
      raise BarError(f"{file} holds a drift set of other settings ({stored.get('settings')} vs {want}): move it "
                     "aside, or give another drift_dir")
    return stored
  params, cfg, tokenizer, compute = model_fn()
  made = build(params, cfg, tokenizer, fingerprint, n=n, max_new_tokens=max_new_tokens, batch_size=batch_size,
               compute=compute)
  os.makedirs(root, exist_ok=True)
  workdir_lib.write_text_atomic(file, json.dumps(made, indent=1))
  return made


def score(params, cfg, tokenizer, drift: dict[str, Any], *, batch_size: int = 4, seq_len: int = 512, mesh=None,
          compute: Compute = Compute()) -> dict[str, Any]:
  """The drift domain's result for one model: per-token NLL of the base's replies [95% interval], per-item
  (nll_sum, tokens), the base's fingerprint."""
  from bar_jax.evals import runner
  res = runner._nll_domain(params, cfg, tokenizer, drift["items"], batch_size=batch_size, seq_len=seq_len, mesh=mesh,
                           compute=compute)
  res.update(metric="nll", higher_is_better=False, base_fingerprint=drift["base_fingerprint"],
             settings=drift["settings"], samples=[])
  return res
