"""A teacher-forced metric checked against its generative counterpart on the same items: for each item, the greedy
match of the item's answer (runner._greedy_domain, one forward pass) and the generative metric on a greedily decoded
reply (runner._generate_domain, then the metric's score). Used once per metric, to say how far the cheap metric
can stand in for decoding (experiments/tool_greedy_vs_ast.py: tool use, call_greedy vs call_match).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from bar_jax.data import capability as capability_lib
from bar_jax.evals import menu, runner, stats
from bar_jax.model.config import Compute


def agreement(forced: list[bool], generated: list[bool]) -> dict[str, Any]:
  """Agreement of two per-item outcomes: the 2 x 2 counts, the agreement rate with its Wilson interval (percent),
  Cohen's kappa, and the exact McNemar test of the two rates."""
  f, g = np.asarray(forced, bool), np.asarray(generated, bool)
  n = int(f.size)
  both, neither = int((f & g).sum()), int((~f & ~g).sum())
  agree = both + neither
  p_obs = agree / n if n else float("nan")
  p_exp = (f.mean() * g.mean() + (1 - f.mean()) * (1 - g.mean())) if n else float("nan")
  kappa = (p_obs - p_exp) / (1 - p_exp) if n and p_exp < 1 else float("nan")
  return {"n": n, "both_right": both, "both_wrong": neither, "forced_only": int((f & ~g).sum()),
          "generated_only": int((~f & g).sum()), "agreement": 100.0 * p_obs,
          "agreement_ci": list(stats.wilson(agree, n)),
          "kappa": float(kappa), "forced_rate": 100.0 * float(f.mean()) if n else float("nan"),
          "generated_rate": 100.0 * float(g.mean()) if n else float("nan"),
          "mcnemar_p": stats.mcnemar_exact(f, g)["p"]}


def greedy_vs_generated(params, cfg, tokenizer, domain: str, *, n: int = 64, generated_metric: str = "call_match",
                        max_new_tokens: int = 128, batch_size: int = 16, nll_seq_len: int = 512,
                        nll_batch_rows: int = 4, compute: Compute = Compute()) -> dict[str, Any]:
  """The first n held-out items of `domain` whose prompt fits the domain's prompt budget, scored both ways.
  Returns {domain, n, agreement..., forced (the teacher-forced domain result), items: [{id, group, forced, generated,
  exact (the reply is the answer's text), reply, answer}]}."""
  cap = capability_lib.get(domain)
  metric = menu.build(generated_metric)
  items = cap.eval_items()
  budget = runner.budgets(cap, tokenizer, items, max_new_tokens)
  prompt_budget = min(budget["prompt_tokens"], cfg.max_seq_len - max_new_tokens)
  kept, skipped = runner._take(items, n, prompt_budget, tokenizer)
  chosen = [it for it, _ in kept]
  forced = runner._greedy_domain(params, cfg, tokenizer, chosen, batch_size=nll_batch_rows, seq_len=nll_seq_len,
                                 mesh=None, compute=compute)
  forced_ok = {rec["id"]: bool(rec["ok"]) for rec in forced["items"]}
  done = runner._generate_domain(params, cfg, tokenizer, kept, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 max_prompt_tokens=prompt_budget, mesh=None, compute=compute)
  scored = [d for d in done if d["id"] in forced_ok]  # an item the forward could not hold is left out of both
  gen_ok = [bool(metric.score(d, d["response"])) for d in scored]
  out = agreement([forced_ok[d["id"]] for d in scored], gen_ok)
  out.update(domain=cap.name, generated_metric=generated_metric, forced_metric=cap.metric.name,
             max_new_tokens=max_new_tokens, prompt_budget=prompt_budget, skipped_prompt_too_long=skipped,
             forced_dropped_too_long=forced["dropped_too_long"], prompt_not_prefix=forced["prompt_not_prefix"],
             forced_nll=forced["nll"], forced_nll_ci=forced["nll_ci"],
             exact_text=100.0 * float(np.mean([d["response"].strip() == runner.answer_text(d).strip()
                                                for d in scored])) if scored else float("nan"),
             items=[{"id": d["id"], "group": d.get("group", ""), "forced": forced_ok[d["id"]], "generated": g,
                     "exact": d["response"].strip() == runner.answer_text(d).strip(), "reply": d["response"],
                     "answer": runner.answer_text(d)} for d, g in zip(scored, gen_ok)])
  return out


def format_agreement(res: dict[str, Any], title: str) -> str:
  """The result as a short markdown report: the 2 x 2 table, agreement [95% interval], kappa, and every item where
  the two disagree."""
  lo, hi = res["agreement_ci"]
  lines = [f"# {title}", "",
           f"{res['domain']}: {res['forced_metric']} (teacher-forced, one forward pass) vs {res['generated_metric']} "
           f"(greedy decoding, {res['max_new_tokens']} new tokens), the same n = {res['n']} held-out items "
           f"(prompts up to {res['prompt_budget']} tokens; {res['skipped_prompt_too_long']} longer passed over).", "",
           "| | generated right | generated wrong |", "|---|---|---|",
           f"| forced right | {res['both_right']} | {res['forced_only']} |",
           f"| forced wrong | {res['generated_only']} | {res['both_wrong']} |", "",
           f"- agreement: {res['agreement']:.1f}% [{lo:.1f}, {hi:.1f}] (Wilson 95%), Cohen's kappa "
           f"{res['kappa']:.2f}",
           f"- rates: forced {res['forced_rate']:.1f}%, generated {res['generated_rate']:.1f}% "
           f"(exact McNemar p = {res['mcnemar_p']:.3g}); reply equal to the canonical text: {res['exact_text']:.1f}%",
           f"- forced call NLL: {res['forced_nll']:.3f} nats/token [{res['forced_nll_ci'][0]:.3f}, "
           f"{res['forced_nll_ci'][1]:.3f}]; prompt_not_prefix {res['prompt_not_prefix']}", ""]
  off = [it for it in res["items"] if it["forced"] != it["generated"]]
  if off:
    lines += ["Items where they disagree:", "", "| id | forced | generated | reply | canonical |",
              "|---|---|---|---|---|"]
    for it in off:
      cut = lambda s: s.replace("|", "\\|").replace("\n", " ")[:120]
      lines.append(f"| {it['id']} | {int(it['forced'])} | {int(it['generated'])} | `{cut(it['reply'])}` | "
                   f"`{cut(it['answer'])}` |")
    lines.append("")
  return "\n".join(lines)
