"""Tables that compare models on the same items: every score with its 95% interval, every row after the first
tested against the first (the reference, usually the base) item by item, and significant differences marked.

  compare(ref, row)   per domain: {change, ci (of the change), p, test, significant, n}; the paired test is exact
                      McNemar on per-item outcomes for percentage metrics and a paired bootstrap of per-token NLL
                      (items resampled jointly) for NLL domains. Items are matched by id; a row without per-item
                      outcomes (an old report) gets no test.
  format_table(rows)  the markdown table (rows = models, columns = domains, overall = mean of percentage metrics).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from bar_jax.evals import stats

MARK = "*"  # after a cell whose difference from the reference row has p < 0.05


def _paired(ref: dict, res: dict) -> tuple[list[dict], list[dict]] | None:
  a = {it["id"]: it for it in ref.get("items") or []}
  b = {it["id"]: it for it in res.get("items") or []}
  common = [i for i in a if i in b]
  if not common:
    return None
  return [a[i] for i in common], [b[i] for i in common]


def compare_domain(ref: dict, res: dict) -> dict[str, Any] | None:
  """The paired change res - ref on their common items (None when either lacks per-item outcomes)."""
  pairs = _paired(ref, res)
  if pairs is None:
    return None
  a, b = pairs
  if res.get("metric") == "nll":
    out = stats.paired_bootstrap([x["nll_sum"] / max(x["tokens"], 1) for x in a],
                                 [x["nll_sum"] / max(x["tokens"], 1) for x in b],
                                 [x["tokens"] for x in a], [x["tokens"] for x in b])
    return {"test": "paired bootstrap", "n": out["n"], "change": out["change"], "ci": list(out["ci"]),
            "p": out["p"], "significant": stats.significant(out["p"])}
  ok_a, ok_b = [bool(x["ok"]) for x in a], [bool(x["ok"]) for x in b]
  test = stats.mcnemar_exact(ok_a, ok_b)
  if "refusal_rate" in res:  # the score is the mean of two rates: the change of each, averaged
    change, ci = _safety_change(a, b)
  else:
    boot = stats.paired_bootstrap([100.0 * x for x in ok_a], [100.0 * x for x in ok_b])
    change, ci = boot["change"], list(boot["ci"])
  return {"test": "exact McNemar", "n": test["n"], "a_only": test["a_only"], "b_only": test["b_only"],
          "change": change, "ci": ci, "p": test["p"], "significant": stats.significant(test["p"])}


def _safety_change(a: list[dict], b: list[dict]) -> tuple[float, list[float]]:
  changes, halves = [], []
  for kind in ("harmful", "benign"):
    xa = [100.0 * x["ok"] for x in a if x.get("kind") == kind]
    xb = [100.0 * y["ok"] for x, y in zip(a, b) if x.get("kind") == kind]
    if xa:
      boot = stats.paired_bootstrap(xa, xb)
      changes.append(boot["change"])
      halves.append((boot["ci"][1] - boot["ci"][0]) / 2)
  if not changes:
    return float("nan"), [float("nan"), float("nan")]
  change = sum(changes) / len(changes)
  half = math.sqrt(sum(h * h for h in halves)) / len(halves)
  return change, [change - half, change + half]


def compare(ref_row: dict, row: dict) -> dict[str, dict]:
  out = {}
  for name, res in row.get("domains", {}).items():
    ref = ref_row.get("domains", {}).get(name)
    if ref is not None:
      c = compare_domain(ref, res)
      if c is not None:
        out[name] = c
  return out


def _fmt_ci(ci) -> str:
  if not ci or any(x is None or not math.isfinite(x) for x in ci):
    return ""
  return f" [{ci[0]:.1f}, {ci[1]:.1f}]"


def cell(res: dict[str, Any] | None, ref: dict[str, Any] | None = None, test: dict | None = None) -> str:
  """One table cell: the score and its interval; NLL as the per-token value with its change vs the reference;
  safety with its refusal (harmful) and answer (benign) rates; a MARK when the paired test says p < 0.05."""
  if not res or not isinstance(res.get("value"), (int, float)) or not math.isfinite(res["value"]):
    return "–"
  mark = MARK if test and test.get("significant") else ""
  if res.get("metric") == "nll":
    ci = res.get("ci")
    text = f"nll {res['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    if ref is not None and ref is not res:
      text += f", {res['value'] - ref['value']:+.3f} vs ref" + mark
    return text
  text = f"{res['value']:.1f}{_fmt_ci(res.get('ci'))}{mark}"
  if "refusal_rate" in res:
    text += f" (ref {res['refusal_rate']:.0f} / ans {res['answer_rate']:.0f})"
  return text


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown table: one row per model ({name, domains: {d: result}, overall, overall_ci}), overall last.

  Percentage cells: score [95% interval]; NLL cells: per-token NLL [interval] and its change vs the first row;
  a * marks a difference from the first row with p < 0.05 on a paired test over the same items (exact McNemar for
  rates, paired bootstrap for NLL). overall = the mean of the percentage columns only."""
  domains: list[str] = []
  for r in rows:
    domains += [d for d in r["domains"] if d not in domains]
  lines = ["| model | " + " | ".join(domains) + " | overall |", "|---" * (len(domains) + 2) + "|"]
  ref_row = rows[0] if rows else None
  for r in rows:
    tests = compare(ref_row, r) if ref_row is not None and r is not ref_row else {}
    cells = [cell(r["domains"].get(d), ref_row["domains"].get(d) if ref_row else None, tests.get(d))
             for d in domains]
    overall = r.get("overall", float("nan"))
    overall = float("nan") if overall is None else overall
    lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {overall:.1f}{_fmt_ci(r.get('overall_ci'))} |")
  note = (f"\n{MARK} p < 0.05 against the first row, paired over the same items (exact McNemar for rates, paired "
          "bootstrap for NLL); [a, b] = 95% interval (Wilson for rates, bootstrap for NLL).\n"
          if len(rows) > 1 else "")
  return "\n".join(lines) + "\n" + note
