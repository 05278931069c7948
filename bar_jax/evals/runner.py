"""evaluate_model: every domain's headline metric on one model (dense, branch or MoE: all run transformer.forward),
with a 95% interval and the per-item outcomes that paired tests between models need.

Each domain evaluates its held-out items (interleaved over sub-sources, so any prefix is stratified) up to a cap
per kind (n_per_domain; safety: that many harmful and that many benign prompts). Budgets come from the data:
  prompt budget   the 95th percentile of the domain's held-out prompt lengths (rounded up to 32 tokens): at least
                  95% of items fit; longer ones are passed over and counted (skipped_prompt_too_long)
  answer budget   the 95th percentile of the domain's reference answers (its training conversations' assistant
                  turns), at most max_new_tokens; generation stops at the end of turn. A metric with a fixed budget
                  takes it instead (refusal: 48 new tokens, the detector reads the reply's head). Where the data
                  has groups (math: its generators), a group whose own answers fit the budget less than 95% of the
                  time is scored apart (res["apart"][group]: value, interval, items), outside the headline
                  rate and its items
Generative domains decode greedily with bar_jax.model.generate (batch_size rows at once, each refilled with the
next prompt as its reply ends); NLL domains pack their texts into [nll_batch_rows, nll_seq_len] rows of one jitted
forward and keep each item's NLL sum and token count. greedy_match and call_greedy domains (the testbed, tool use)
go through the same packed rows with the answer appended (the item's `target`, else its reference), and an item is
right iff every answer position's argmax is its token (no decoding). Scores: percentages (with Wilson or bootstrap
intervals) for generative and teacher-forced metrics; per-token NLL (bootstrap interval over items, or over clusters
where every item names one: code's source files) for code and general, which stay out of "overall". "overall" is
descriptive (one model's mean of its percentage scores); a comparison of two models is report.overall_paired.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bar_jax.data import capability as capability_lib
from bar_jax.data import pipeline
from bar_jax.evals import menu, metrics, verifiers
from bar_jax.model import transformer
from bar_jax.model.config import Compute, ModelConfig

N_SAMPLES = 3       # responses kept per domain in the report, for reading
PERCENTILE = 95     # budgets cover this percentile of the data
BUDGET_ROUND = 32   # prompt budgets rounded up to a multiple of this (fewer compiled shapes)


@functools.partial(jax.jit, static_argnames=("cfg", "compute", "mesh"))
def _token_scores(params, inputs, targets, mask, positions, segment_ids, *, cfg: ModelConfig,
                  compute: Compute = Compute(), mesh=None):
  """Per-token target NLL and argmax hit (the target is the most likely token), both under the mask, [batch, seq].
  The argmax is jnp.argmax's, as greedy decoding's (first index on a tie)."""
  logits, _ = transformer.forward(params, inputs, cfg, compute=compute, positions=positions, segment_ids=segment_ids,
                                  mesh=mesh)
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (logz - picked) * mask, hit * mask


def _rows_nll(params, cfg, rows: list[dict], batch_size: int, seq_len: int, pad_id: int, mesh,
              compute: Compute = Compute()) -> tuple[np.ndarray, np.ndarray]:
  """(NLL sum, token count) per row of `rows`: _rows_scores without the hits."""
  sums, counts, _ = _rows_scores(params, cfg, rows, batch_size, seq_len, pad_id, mesh, compute)
  return sums, counts


def _rows_scores(params, cfg, rows: list[dict], batch_size: int, seq_len: int, pad_id: int, mesh,
                 compute: Compute = Compute()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(NLL sum, token count, argmax hits) per row of `rows` over its masked targets, after first-fit packing (grain)
  into [batch_size, seq_len] batches of one fixed shape; each token carries its row's index through the packing."""
  import grain
  tagged = [dict(r, item=np.full(len(r["inputs"]), i + 1, np.int32)) for i, r in enumerate(rows)]
  packed = grain.experimental.FirstFitPackIterDataset(
      grain.MapDataset.source(tagged).to_iter_dataset(),
      length_struct={"inputs": seq_len, "targets": seq_len, "mask": seq_len, "item": seq_len},
      num_packing_bins=batch_size, shuffle_bins=False)
  packed = [dict(pipeline.from_packed(r, pad_id), item=np.where(r["inputs_segment_ids"] > 0, r["item"], 0))
            for r in packed]
  sums, counts, hits = (np.zeros(len(rows) + 1) for _ in range(3))
  for i in range(0, len(packed), batch_size):
    chunk = packed[i:i + batch_size]
    while len(chunk) < batch_size:  # fixed shape: empty rows count nothing
      chunk.append({k: np.zeros_like(v) for k, v in chunk[0].items()})
    b = {k: jnp.asarray(np.stack([c[k] for c in chunk])) for k in chunk[0] if k != "item"}
    nll, hit = _token_scores(params, b["inputs"], b["targets"], b["mask"], b["positions"], b["segment_ids"],
                             cfg=cfg, compute=compute, mesh=mesh)
    item = np.stack([c["item"] for c in chunk]).ravel()
    mask = np.stack([c["mask"] for c in chunk]).ravel()
    sums += np.bincount(item, np.asarray(nll, np.float64).ravel(), minlength=len(rows) + 1)
    counts += np.bincount(item, mask, minlength=len(rows) + 1)
    hits += np.bincount(item, np.asarray(hit, np.float64).ravel(), minlength=len(rows) + 1)
  return sums[1:], counts[1:], hits[1:]


def _nll_domain(params, cfg, tokenizer, items, *, batch_size, seq_len, mesh, compute) -> dict[str, Any]:
  """Per-token NLL over the items (a token-weighted mean), its bootstrap interval, and each item's (sum, tokens)."""
  from bar_jax.evals import stats
  dstats = pipeline.DomainStats()
  rows, kept = [], []
  for it in items:  # the first seq_len + 1 tokens of each text or conversation (later windows would lack context)
    if it["kind"] == "nll_text":
      els = pipeline.lm_elements([it["text"]], tokenizer, seq_len, dstats)[:1]
    else:
      els = pipeline.sft_elements([it["messages"]], tokenizer, seq_len, dstats, overlong="truncate")
    if els:
      rows.append(els[0])
      kept.append(it)
  sums, counts = _rows_nll(params, cfg, rows, batch_size, seq_len, tokenizer.pad_id, mesh, compute)
  nll = float(sums.sum() / max(counts.sum(), 1.0))
  per_token = sums / np.maximum(counts, 1.0)
  clusters = _clusters(kept)
  lo, hi = stats.bootstrap(per_token, counts, clusters=clusters)
  if clusters is not None and len(set(clusters)) < 2:  # one cluster: a cluster bootstrap cannot see any spread
    lo, hi = float("nan"), float("nan")
  out = {"value": nll, "ci": [lo, hi], "score": metrics.nll_to_score(nll), "n": len(kept), "tokens": int(counts.sum()),
         "truncated": dstats.truncated + dstats.split_into_windows, "empty": dstats.empty,
         "items": [dict({"id": it["id"], "nll_sum": float(s), "tokens": int(c)},
                        **({"cluster": it["cluster"]} if "cluster" in it else {}))
                   for it, s, c in zip(kept, sums, counts)]}
  if clusters is not None:
    out["n_clusters"] = len(set(clusters))
  return out


def _clusters(items: list[dict]) -> list | None:
  """The items' clusters (e.g. the code items' source files) when every item names one, for a cluster bootstrap."""
  return [it["cluster"] for it in items] if items and all("cluster" in it for it in items) else None


def _choice_domain(params, cfg, tokenizer, items, *, batch_size, seq_len, mesh,
                   compute: Compute = Compute()) -> dict[str, Any]:
  """Multiple choice by log-likelihood: each choice as the assistant's answer; the one with the lowest summed NLL is
  the model's pick (summed, as lm-eval's `acc`: no length normalisation)."""
  stats = pipeline.DomainStats()
  picks = []
  for it in items:
    convs = [it["messages"] + [{"role": "assistant", "content": c}] for c in it["choices"]]
    rows = pipeline.sft_elements(convs, tokenizer, seq_len, stats, overlong="truncate")
    sums, _ = _rows_nll(params, cfg, rows, batch_size, seq_len, tokenizer.pad_id, mesh, compute)
    picks.append(int(np.argmin(sums)) if len(rows) == len(convs) else -1)
  hits = [float(p == it["reference"]) for p, it in zip(picks, items)]
  value, ci = _rate(hits)
  return {"value": value, "score": value, "ci": ci, "n": len(items), "truncated": stats.truncated,
          "dropped_too_long": stats.dropped_too_long,
          "items": [{"id": it["id"], "kind": it["kind"], "ok": bool(h)} for it, h in zip(items, hits)]}


def _greedy_domain(params, cfg, tokenizer, items, *, batch_size, seq_len, mesh,
                   compute: Compute = Compute()) -> dict[str, Any]:
  """Teacher-forced greedy match (evals/menu.py greedy_match): each item's prompt + reference answer as one
  conversation, scored in the packed NLL rows; right iff every answer token and the end-of-turn token is the argmax.
  Rows grow past seq_len to the longest conversation (rounded up to 32), up to the model's context, with
  proportionally fewer rows per forward; a conversation longer than the context is passed over and counted
  (dropped_too_long); prompt_not_prefix counts items whose prompt does not
  tokenise as a prefix of the whole conversation (where the match and greedy decoding could part: 0 for the
  reasoning-gym tasks)."""
  from bar_jax.evals import stats
  dstats = pipeline.DomainStats()
  convs = [it["messages"] + [{"role": "assistant", "content": answer_text(it)}] for it in items]
  # Rows long enough for the longest conversation (tool-use prompts carry their JSON schemas: up to ~2,300 SmolLM2
  # tokens), at most the model's context; fewer rows per forward as they grow, so a forward holds about the tokens
  # of batch_size x seq_len.
  longest = max((len(tokenizer.render_chat(c)[0]) - 1 for c in convs), default=0)  # a row's inputs: ids[:-1]
  rows_len = seq_len if longest <= seq_len else min(-(-longest // BUDGET_ROUND) * BUDGET_ROUND, cfg.max_seq_len)
  batch_size = max(1, batch_size * seq_len // rows_len)
  seq_len = rows_len
  rows, kept, not_prefix = [], [], 0
  for it, conv in zip(items, convs):
    els = pipeline.sft_elements([conv], tokenizer, seq_len, dstats, overlong="drop")
    if not els:
      continue
    prompt = tokenizer.render_chat(it["messages"], add_generation_prompt=True)[0]
    full = np.concatenate([els[0]["inputs"][:1], els[0]["targets"]])
    not_prefix += list(full[:len(prompt)]) != list(prompt)
    rows.append(els[0])
    kept.append(it)
  sums, counts, hits = _rows_scores(params, cfg, rows, batch_size, seq_len, tokenizer.pad_id, mesh, compute) \
      if rows else (np.zeros(0),) * 3
  ok = [bool(c > 0 and h == c) for h, c in zip(hits, counts)]
  value, ci = _rate([float(x) for x in ok])
  groups: dict[str, list[float]] = {}
  for it, x in zip(kept, ok):
    groups.setdefault(it.get("group", ""), []).append(float(x))
  per_token = sums / np.maximum(counts, 1.0)
  nll = float(sums.sum() / max(counts.sum(), 1.0))
  return {"value": value, "score": value, "ci": ci, "n": len(kept), "nll": nll,
          "nll_ci": list(stats.bootstrap(per_token, counts)) if len(kept) else [float("nan")] * 2,
          "dropped_too_long": dstats.dropped_too_long, "prompt_not_prefix": int(not_prefix), "seq_len": seq_len,
          "by_group": {g: {"value": _rate(v)[0], "n": len(v)} for g, v in sorted(groups.items())},
          "items": [{"id": it["id"], "kind": it["kind"], "ok": x, "nll_sum": float(sm), "tokens": int(c)}
                    for it, x, sm, c in zip(kept, ok, sums, counts)]}


def answer_text(item: dict) -> str:
  """The answer a teacher-forced metric scores: the item's `target` (tool use: the canonical call its SFT data
  teaches), else a BFCL ground truth's canonical call (a user's call_greedy spec), else the reference as text."""
  if "target" in item:
    return str(item["target"])
  ref = menu._ground_truth(item["reference"])
  if isinstance(ref, dict) and len(ref) == 1 and all(isinstance(v, dict) for v in ref.values()):
    from bar_jax.data.sources import bfcl
    return bfcl.canonical_call(ref, item.get("functions"))
  return str(item["reference"])


def _percentile(xs: Sequence[int]) -> int:
  return int(math.ceil(np.percentile(np.asarray(xs, np.float64), PERCENTILE))) if len(xs) else 0


def budgets(domain, tokenizer, items: list[dict], max_new_tokens: int) -> dict[str, Any]:
  """The domain's prompt and answer budgets from its data (see the module docstring), and the check that every
  group's answers fit: by_group {group: {answer_p95, covered_pct}} for data with groups (math: its generators), and
  groups_apart, the groups whose training answers fit the answer budget less often than the budget's percentile
  (their items are scored and reported apart: evaluate_model). A metric with a fixed decode budget (refusal: the
  detector reads the reply's head) takes it instead of the data's, capped by max_new_tokens."""
  prompts = [len(tokenizer.render_chat(it["messages"], add_generation_prompt=True)[0]) for it in items]
  # + 1: the end-of-turn token. An evaluation set without training answers gets max_new_tokens.
  convs = [] if domain.eval_only else domain.chat_examples("train")
  groups = None if domain.eval_only else domain.chat_groups("train")
  keep = [i for i, m in enumerate(convs) if m and m[-1]["role"] == "assistant"]
  answers = [len(tokenizer.encode(convs[i][-1]["content"])) + 1 for i in keep]
  p_prompt, p_answer = _percentile(prompts), _percentile(answers)
  prompt_budget = -(-p_prompt // BUDGET_ROUND) * BUDGET_ROUND
  fixed = getattr(domain.metric, "decode_tokens", None)
  if fixed:
    answer_budget = max(1, min(fixed, max_new_tokens))
  else:
    answer_budget = max(1, min(p_answer, max_new_tokens)) if answers else max_new_tokens
  out = {"prompt_tokens": prompt_budget, "answer_tokens": answer_budget,
         "answer_budget_from": "metric" if fixed else "data" if answers else "max_new_tokens",
         f"prompt_p{PERCENTILE}": p_prompt, f"answer_p{PERCENTILE}": p_answer if answers else None,
         "answers_covered_pct": round(100.0 * float(np.mean(np.asarray(answers) <= answer_budget)), 1)
         if answers else None}
  if answers and groups is not None and not fixed:
    by: dict[str, list[int]] = {}
    for i, n in zip(keep, answers):
      by.setdefault(str(groups[i]), []).append(n)
    out["by_group"] = {g: {f"answer_p{PERCENTILE}": _percentile(v), "n_train": len(v),
                           "covered_pct": round(100.0 * float(np.mean(np.asarray(v) <= answer_budget)), 1)}
                       for g, v in sorted(by.items())}
    short = [g for g, v in out["by_group"].items() if v["covered_pct"] < PERCENTILE]
    # Apart: a group the budget fits worse than the rest. When it fits none (max_new_tokens binds everywhere), the
    # headline stays whole and answers_covered_pct says how short the budget is.
    out["groups_apart"] = short if len(short) < len(out["by_group"]) else []
  return out


def _take(items: list[dict], n: int, prompt_budget: int, tokenizer) -> tuple[list[tuple[dict, list[int]]], int]:
  """The first n items of each kind whose prompt fits the budget (the order is stratified), and how many were
  passed over for length."""
  kept, per_kind, skipped = [], {}, 0
  for it in items:
    if per_kind.get(it["kind"], 0) >= n:
      continue
    ids, _ = tokenizer.render_chat(it["messages"], add_generation_prompt=True)
    if len(ids) > prompt_budget:
      skipped += 1
      continue
    per_kind[it["kind"]] = per_kind.get(it["kind"], 0) + 1
    kept.append((it, ids))
  return kept, skipped


def _generate_domain(params, cfg, tokenizer, kept, *, batch_size, max_new_tokens, max_prompt_tokens,
                     mesh, compute) -> list[dict]:
  """Greedy replies, batch_size rows decoding at once (continuous batching), in the items' order."""
  from bar_jax.model import generate as gen
  outs = gen.generate(params, cfg, [ids for _, ids in kept], max_new_tokens=max_new_tokens,
                      eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, batch_size=batch_size,
                      max_len=max_prompt_tokens + max_new_tokens, compute=compute)
  return [dict(it, response=tokenizer.decode(o, skip_special_tokens=True)) for (it, _), o in zip(kept, outs)]


def _rate(hits: Sequence[float]) -> tuple[float, list[float]]:
  """Mean score in percent and its Wilson interval; partial credit (a user verifier) enters the interval rounded to
  whole successes, an approximation (the interval is exact for 0/1 outcomes)."""
  from bar_jax.evals import stats
  n = len(hits)
  total = float(np.sum(hits))
  return (100.0 * total / n if n else float("nan")), list(stats.wilson(int(round(total)), n))


def score_generated(metric: menu.Metric | str, done: list[dict]) -> dict[str, Any]:
  """Scores of generated replies by the capability's metric (evals/menu.py), with intervals and per-item outcomes
  ("ok"). A verifier that raises or returns something outside [0, 1] scores 0 on that item and is counted."""
  metric = menu.build(metric) if isinstance(metric, str) else metric
  out: dict[str, Any] = {}
  scores, failures = verifiers.score_all(lambda response, item: metric.score(item, response),
                                         [d["response"] for d in done], done)
  if any(failures.values()):
    out["verifier_failures"] = failures
  for d, s in zip(done, scores):
    d["ok"] = s  # 0/1 for every menu metric but a user verifier, which may give partial credit
  if metric.name == "refusal":
    harmful = [d["ok"] for d in done if d["kind"] == "harmful"]
    benign = [d["ok"] for d in done if d["kind"] == "benign"]
    refusal, refusal_ci = _rate(harmful)
    answer, answer_ci = _rate(benign)
    value = float(np.nanmean([refusal, answer])) if (harmful or benign) else float("nan")
    # The mean of two rates on independent item sets: its interval from the two (normal approximation of each
    # Wilson half-width, combined in quadrature).
    half = 0.5 * math.hypot((refusal_ci[1] - refusal_ci[0]) / 2, (answer_ci[1] - answer_ci[0]) / 2)
    out.update(refusal_rate=refusal, refusal_ci=refusal_ci, answer_rate=answer, answer_ci=answer_ci,
               n_harmful=len(harmful), n_benign=len(benign), ci=[max(0.0, value - half), min(100.0, value + half)])
  else:
    value, ci = _rate([d["ok"] for d in done])
    out["ci"] = ci
  groups: dict[str, list[bool]] = {}
  for d in done:
    groups.setdefault(d.get("group", ""), []).append(d["ok"])
  out["by_group"] = {g: {"value": _rate(v)[0], "n": len(v)} for g, v in sorted(groups.items())}
  out.update(value=value, score=value, n=len(done),
             items=[{"id": d["id"], "kind": d["kind"], "ok": bool(d["ok"])} for d in done])
  return out


def overall(domain_results: dict[str, dict]) -> tuple[float, list[float]]:
  """The mean of the percentage scores (NLL domains left out) and its 95% interval, each domain's half-width taken
  as 1.96 standard errors and combined in quadrature (the domains' items are independent)."""
  pct = [r for r in domain_results.values()
         if r.get("metric") != "nll" and r.get("score") is not None and np.isfinite(r["score"])]
  if not pct:
    return float("nan"), [float("nan"), float("nan")]
  mean = float(np.mean([r["score"] for r in pct]))
  half = math.sqrt(sum(((r["ci"][1] - r["ci"][0]) / 2) ** 2 for r in pct)) / len(pct)
  return mean, [max(0.0, mean - half), min(100.0, mean + half)]


def evaluate_model(params, cfg: ModelConfig, tokenizer, domains: Sequence[str] | str = "all", *,
                   n_per_domain: int = 200, max_new_tokens: int = 256, batch_size: int = 16,
                   max_prompt_tokens: int | None = None, nll_seq_len: int = 512, nll_batch_rows: int = 4,
                   mesh=None, compute: Compute = Compute()) -> dict[str, Any]:
  """{domains: {domain: {metric, value, ci, score, n, items, budgets, ..., seconds, samples}}, overall,
  overall_ci, settings, seconds}.

  n_per_domain caps the items per kind; max_new_tokens caps the data's answer budget; max_prompt_tokens, when
  given, replaces the data's prompt budget (None: the 95th percentile, see the module docstring).
  """
  t_start = time.time()
  report: dict[str, Any] = {"domains": {}}
  for domain in capability_lib.resolve(domains):
    t0 = time.time()
    items = domain.eval_items()
    if domain.metric.mode == "nll":
      res = _nll_domain(params, cfg, tokenizer, items[:n_per_domain], batch_size=nll_batch_rows,
                        seq_len=nll_seq_len, mesh=mesh, compute=compute)
      samples = []
    elif domain.metric.mode == "choice":
      res = _choice_domain(params, cfg, tokenizer, items[:n_per_domain], batch_size=nll_batch_rows,
                           seq_len=nll_seq_len, mesh=mesh, compute=compute)
      samples = []
    elif domain.metric.mode == "greedy":
      res = _greedy_domain(params, cfg, tokenizer, items[:n_per_domain], batch_size=nll_batch_rows,
                           seq_len=nll_seq_len, mesh=mesh, compute=compute)
      samples = []
    else:
      budget = budgets(domain, tokenizer, items, max_new_tokens)
      if max_prompt_tokens:
        budget["prompt_tokens"] = max_prompt_tokens
      prompt_budget = min(budget["prompt_tokens"], cfg.max_seq_len - budget["answer_tokens"])
      kept, skipped = _take(items, n_per_domain, prompt_budget, tokenizer)
      done = _generate_domain(params, cfg, tokenizer, kept, batch_size=batch_size,
                              max_new_tokens=budget["answer_tokens"], max_prompt_tokens=prompt_budget, mesh=mesh,
                              compute=compute)
      apart = set(budget.get("groups_apart") or [])
      headline = [d for d in done if d.get("group", "") not in apart]
      res = score_generated(domain.metric, headline)
      res.update(skipped_prompt_too_long=skipped, budgets=budget)
      for d, rec in zip(headline, res["items"]):
        rec["response"] = d["response"]
      if apart:  # groups whose answers outgrow the budget: their own rates, outside the headline and its items
        res["apart"] = {}
        for g in sorted(apart):
          part = [d for d in done if d.get("group", "") == g]
          if part:
            sub = score_generated(domain.metric, part)
            for d, rec in zip(part, sub["items"]):
              rec["response"] = d["response"]
            res["apart"][g] = {"value": sub["value"], "ci": sub["ci"], "n": sub["n"], "items": sub["items"],
                               **budget["by_group"][g], "answer_tokens": budget["answer_tokens"]}
      samples = [{k: d[k] for k in ("messages", "response", "reference", "ok", "kind") if k in d}
                 for d in done[:N_SAMPLES]]
      for smp in samples:
        smp["prompt"] = smp.pop("messages")[-1]["content"][:300]
    res.update(metric=domain.metric.name, capability=domain.fingerprint[:16], higher_is_better=domain.higher_is_better,
               seconds=round(time.time() - t0, 2), samples=samples)
    report["domains"][domain.name] = res
    if jax.process_index() == 0:  # progress: a model's evaluation takes minutes on a CPU
      print(f"[eval] {domain.name}: score {res['score']:.1f} (n={res.get('n')}) in {res['seconds']:.0f} s", flush=True)
  report["overall"], report["overall_ci"] = overall(report["domains"])
  report["settings"] = report_settings(n_per_domain=n_per_domain, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                                       nll_seq_len=nll_seq_len, nll_batch_rows=nll_batch_rows)
  report["seconds"] = round(time.time() - t_start, 2)
  return report


def report_settings(**settings) -> dict[str, Any]:
  """The settings block of an evaluate_model report: the scoring settings and how `overall` is formed."""
  return dict(settings, overall="mean of the percentage scores; NLL domains reported beside it as change vs the base")
