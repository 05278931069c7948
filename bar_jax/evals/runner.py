"""evaluate_model: every capability's metric on one model (dense, branch or MoE: all run transformer.forward).

The metric comes from the capability's spec (evals/menu.py) and its mode decides how: "generate" metrics (math,
tool_use, safety, user verifiers) decode greedily with bar_jax.model.generate, a few prompts per call at a fixed batch
size, and score each reply; "nll" metrics (code, general) and "choice" (multiple choice by log-likelihood) run one
jitted forward of fixed shape [batch_size, nll_seq_len], so a whole evaluation compiles a handful of programs. Scores: percentages for generative metrics; per-token NLL as is for
code and general, mapped to 100 * exp(-nll) only for the table's overall mean (metrics.nll_to_score).
"""
from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bar_jax.data import capability as capability_lib
from bar_jax.data import pipeline
from bar_jax.evals import metrics, verifiers
from bar_jax.model import transformer
from bar_jax.model.config import Compute, ModelConfig

N_SAMPLES = 3  # responses kept per domain in the report, for reading


@functools.partial(jax.jit, static_argnames=("cfg", "compute", "mesh"))
def _nll_rows(params, inputs, targets, mask, positions, segment_ids, *, cfg: ModelConfig, compute: Compute = Compute(),
              mesh=None):
  """Per-row (sum of target NLL under mask, count of masked tokens)."""
  logits, _ = transformer.forward(params, inputs, cfg, compute=compute, positions=positions, segment_ids=segment_ids,
                                  mesh=mesh)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return ((logz - picked) * mask).sum(-1), mask.sum(-1)


def _rows_nll(params, cfg, rows: list[dict], batch_size: int, seq_len: int, pad_id: int, mesh,
              compute: Compute = Compute()) -> tuple[float, float]:
  """Rows first-fit packed (grain) into [batch_size, seq_len] batches of one fixed shape."""
  import grain
  packed = grain.experimental.FirstFitPackIterDataset(
      grain.MapDataset.source(rows).to_iter_dataset(),
      length_struct={"inputs": seq_len, "targets": seq_len, "mask": seq_len}, num_packing_bins=batch_size,
      shuffle_bins=False)
  packed = [pipeline.from_packed(r, pad_id) for r in packed]
  total, count = 0.0, 0.0
  for i in range(0, len(packed), batch_size):
    chunk = packed[i:i + batch_size]
    while len(chunk) < batch_size:  # fixed shape: empty rows count nothing
      chunk.append({k: np.zeros_like(v) for k, v in chunk[0].items()})
    b = {k: jnp.asarray(np.stack([c[k] for c in chunk])) for k in chunk[0]}
    s, n = _nll_rows(params, b["inputs"], b["targets"], b["mask"], b["positions"], b["segment_ids"], cfg=cfg,
                     compute=compute, mesh=mesh)
    total += float(np.asarray(s).sum())
    count += float(np.asarray(n).sum())
  return total, count


def _nll_domain(params, cfg, tokenizer, items, *, batch_size, seq_len, mesh, compute) -> dict[str, Any]:
  stats = pipeline.DomainStats()
  texts = [it["text"] for it in items if it["kind"] == "nll_text"]
  chats = [it["messages"] for it in items if it["kind"] == "nll_chat"]
  rows = []
  if texts:  # score the first seq_len + 1 tokens of each passage (later windows would lack their context)
    rows += [r for r in _first_windows(texts, tokenizer, seq_len, stats)]
  if chats:
    rows += pipeline.sft_elements(chats, tokenizer, seq_len, stats, overlong="truncate")
  total, count = _rows_nll(params, cfg, rows, batch_size, seq_len, tokenizer.pad_id, mesh, compute)
  nll = total / max(count, 1.0)
  return {"value": nll, "score": metrics.nll_to_score(nll), "n": len(items), "tokens": int(count),
          "truncated": stats.truncated + stats.split_into_windows, "empty": stats.empty}


def _first_windows(texts, tokenizer, seq_len, stats):
  for text in texts:
    els = pipeline.lm_elements([text], tokenizer, seq_len, stats)
    if els:
      yield els[0]


def _generate_domain(params, cfg, tokenizer, items, *, n, batch_size, max_new_tokens, max_prompt_tokens,
                     mesh, compute) -> tuple[list[dict], int]:
  """Greedy replies to the first n items whose prompt fits max_prompt_tokens; the longer ones passed over are
  counted (BFCL items with long schemas: a short prompt budget favours items with few, small functions)."""
  from bar_jax.model import generate as gen
  kept, prompts, skipped = [], [], 0
  for it in items:
    if len(kept) == n:
      break
    ids, _ = tokenizer.render_chat(it["messages"], add_generation_prompt=True)
    if len(ids) > max_prompt_tokens:
      skipped += 1
      continue
    kept.append(it)
    prompts.append(ids)
  replies = []
  for i in range(0, len(prompts), batch_size):
    outs = gen.generate(params, cfg, prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                        eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                        max_len=max_prompt_tokens + max_new_tokens, compute=compute)
    replies += [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
  return [dict(it, response=r) for it, r in zip(kept, replies)], skipped


def _score_generated(metric, done: list[dict]) -> dict[str, Any]:
  """The metric's per-item scores (a verifier that fails on an item scores 0 there and is counted)."""
  out: dict[str, Any] = {}
  scores, failures = verifiers.score_all(lambda response, item: metric.score(item, response),
                                         [d["response"] for d in done], done)
  if any(failures.values()):
    out["verifier_failures"] = failures
  if metric.name == "refusal":
    harmful = [s for d, s in zip(done, scores) if d["kind"] == "harmful"]
    benign = [s for d, s in zip(done, scores) if d["kind"] == "benign"]
    refusal = 100.0 * float(np.mean(harmful)) if harmful else float("nan")
    answer = 100.0 * float(np.mean(benign)) if benign else float("nan")
    out.update(refusal_rate=refusal, answer_rate=answer, n_harmful=len(harmful), n_benign=len(benign))
    value = float(np.nanmean([refusal, answer])) if (harmful or benign) else float("nan")
  else:
    for d, s in zip(done, scores):
      d["correct"] = s
    value = 100.0 * float(np.mean(scores)) if scores else float("nan")
    groups: dict[str, list[float]] = {}
    for d, s in zip(done, scores):
      groups.setdefault(d.get("group", ""), []).append(s)
    out["by_group"] = {g: 100.0 * float(np.mean(v)) for g, v in sorted(groups.items())}
  out.update(value=value, score=value, n=len(done))
  return out


def _choice_domain(params, cfg, tokenizer, items, *, batch_size, seq_len, mesh,
                   compute: Compute = Compute()) -> dict[str, Any]:
  """Multiple choice by log-likelihood: each choice as the assistant's answer; the one with the lowest summed NLL is
  the model's pick (summed, as lm-eval's `acc`: no length normalisation)."""
  stats = pipeline.DomainStats()
  picks = []
  for it in items:
    convs = [it["messages"] + [{"role": "assistant", "content": c}] for c in it["choices"]]
    rows = pipeline.sft_elements(convs, tokenizer, seq_len, stats, overlong="truncate")
    nll = [_rows_nll(params, cfg, [r], batch_size, seq_len, tokenizer.pad_id, mesh, compute)[0] for r in rows]
    picks.append(int(np.argmin(nll)) if len(nll) == len(convs) else -1)
  hits = [p == it["reference"] for p, it in zip(picks, items)]
  value = 100.0 * float(np.mean(hits)) if hits else float("nan")
  return {"value": value, "score": value, "n": len(items), "truncated": stats.truncated,
          "dropped_too_long": stats.dropped_too_long}


def evaluate_model(params, cfg: ModelConfig, tokenizer, domains: Sequence[str] | str = "all", *,
                   n_per_domain: int = 16, max_new_tokens: int = 48, batch_size: int = 16,
                   max_prompt_tokens: int = 256, nll_seq_len: int = 256, nll_batch_rows: int = 4,
                   mesh=None, compute: Compute = Compute()) -> dict[str, Any]:
  """{domain: {metric, value, score, n, ..., seconds, samples}, "overall": mean score, "seconds": total}.

  domains: capability names or spec paths (a list or comma-separated; "all" = the built-ins). Generative domains
  answer their first n_per_domain held-out prompts of at most max_prompt_tokens (batch_size per generate call); NLL domains score n_per_domain held-out texts packed into [nll_batch_rows, nll_seq_len] rows.
  """
  t_start = time.time()
  report: dict[str, Any] = {"domains": {}}
  for domain in capability_lib.resolve(domains):
    t0 = time.time()
    items = domain.eval_items()
    if domain.metric.mode == "nll":
      res = _nll_domain(params, cfg, tokenizer, items[:n_per_domain], batch_size=nll_batch_rows, seq_len=nll_seq_len,
                        mesh=mesh, compute=compute)
      samples = []
    elif domain.metric.mode == "choice":
      res = _choice_domain(params, cfg, tokenizer, items[:n_per_domain], batch_size=nll_batch_rows,
                           seq_len=nll_seq_len, mesh=mesh, compute=compute)
      samples = []
    else:
      done, skipped = _generate_domain(params, cfg, tokenizer, items, n=n_per_domain, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, mesh=mesh,
                                       compute=compute)
      res = _score_generated(domain.metric, done)
      res["skipped_prompt_too_long"] = skipped
      samples = [{k: d[k] for k in ("messages", "response", "reference", "correct", "kind") if k in d}
                 for d in done[:N_SAMPLES]]
      for s in samples:
        s["prompt"] = s.pop("messages")[-1]["content"][:300]
    res.update(metric=domain.metric.name, higher_is_better=domain.higher_is_better,
               seconds=round(time.time() - t0, 2), samples=samples, capability=domain.fingerprint[:16])
    report["domains"][domain.name] = res
  scores = [r["score"] for r in report["domains"].values() if np.isfinite(r["score"])]
  report["overall"] = float(np.mean(scores)) if scores else float("nan")
  report["settings"] = dict(n_per_domain=n_per_domain, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            max_prompt_tokens=max_prompt_tokens, nll_seq_len=nll_seq_len,
                            nll_batch_rows=nll_batch_rows,
                            overall="mean of domain scores; NLL domains scored as 100*exp(-nll)")
  report["seconds"] = round(time.time() - t_start, 2)
  return report
