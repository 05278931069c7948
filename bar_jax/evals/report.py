"""Tables that compare models on the same items: every score with its 95% interval, every row after the first
tested against the first (the reference, usually the base) item by item, and significant differences marked.

  compare(ref, row)   per domain: {change, ci (of the change), p, test, significant, n}; the paired test is exact
                      McNemar on per-item outcomes for percentage metrics and a paired bootstrap of per-token NLL
                      (items resampled jointly; by cluster where items name one, e.g. code by source file) for NLL
                      domains; safety's interval resamples its harmful and benign halves apart (strata); a
                      teacher-forced domain (greedy_match, call_greedy) also gets its answer NLL's paired change.
                      Items are matched by id; a row without per-item outcomes (an old report) gets no test.
  equivalence(ref, row)  a claim "row equals ref" per domain by TOST at stated margins (+-5 points, +-0.02 nats per
                      token), Holm's correction across the domains of the claim.
  overall_paired(ref, row)  "overall" as a paired test: the mean over domains of per-item standardised changes, a
                      bootstrap stratified by domain (stats.standardised_gain).
  format_table(rows)  the markdown table (rows = models, columns = domains, overall = mean of percentage metrics,
                      and for two rows or more the paired overall against the first row).
  write_table(workdir, rows, title, command)  the pipeline's WORKDIR/results.md (the table, the command that made
                      it, the eval settings) and results.json (every row with its per-item outcomes, replies left out).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np

from bar_jax.errors import BarError
from bar_jax.evals import protocol, stats

RESULTS_MD, RESULTS_JSON = "results.md", "results.json"
MARK = "*"  # after a cell whose difference from the reference row has p < 0.05


def _paired(ref: dict, res: dict) -> tuple[list[dict], list[dict]] | None:
  a = {it["id"]: it for it in ref.get("items") or []}
  b = {it["id"]: it for it in res.get("items") or []}
  common = [i for i in a if i in b]
  if not common:
    return None
  return [a[i] for i in common], [b[i] for i in common]


NLL_MARGIN = protocol.NLL_MARGIN        # nats per token: the equivalence margin of NLL domains
POINTS_MARGIN = protocol.POINTS_MARGIN  # percentage points: the equivalence margin of rates


def _arrays(res: dict, a: list[dict], b: list[dict], what: str = "") -> dict[str, Any]:
  """One domain's paired per-item outcomes as the stats functions take them: {kind: "nll" | "rate", a, b,
  weights_a, weights_b, strata, clusters, sign}. what="nll" reads a teacher-forced domain's answer NLL."""
  clusters = [x["cluster"] for x in a] if a and all("cluster" in x for x in a) else None
  if res.get("metric") == "nll" or what == "nll":
    per = lambda xs: [x["nll_sum"] / max(x["tokens"], 1) for x in xs]
    return {"kind": "nll", "a": per(a), "b": per(b), "weights_a": [x["tokens"] for x in a],
            "weights_b": [x["tokens"] for x in b], "strata": None, "clusters": clusters, "sign": -1}
  strata = [x.get("kind") for x in a] if "refusal_rate" in res else None  # safety: the mean of two rates
  return {"kind": "rate", "a": [100.0 * x["ok"] for x in a], "b": [100.0 * x["ok"] for x in b], "weights_a": None,
          "weights_b": None, "strata": strata, "clusters": clusters, "sign": 1}


def _boot(d: dict) -> dict:
  return stats.paired_bootstrap(d["a"], d["b"], d["weights_a"], d["weights_b"], strata=d["strata"],
                                clusters=d["clusters"])


def compare_domain(ref: dict, res: dict) -> dict[str, Any] | None:
  """The paired change res - ref on their common items (None when either lacks per-item outcomes)."""
  pairs = _paired(ref, res)
  if pairs is None:
    return None
  a, b = pairs
  d = _arrays(res, a, b)
  if d["kind"] == "nll":
    out = _boot(d)
    return {"test": "paired bootstrap" + (" by cluster" if d["clusters"] is not None else ""), "n": out["n"],
            "change": out["change"], "ci": list(out["ci"]), "p": out["p"], "significant": stats.significant(out["p"]),
            **({"n_clusters": out["n_clusters"]} if "n_clusters" in out else {})}
  ok_a, ok_b = [bool(x["ok"]) for x in a], [bool(x["ok"]) for x in b]
  test = stats.mcnemar_exact(ok_a, ok_b)
  boot = _boot(d)  # safety: the mean of the harmful and benign changes, each half resampled within itself
  out = {"test": "exact McNemar", "n": test["n"], "a_only": test["a_only"], "b_only": test["b_only"],
         "change": boot["change"], "ci": list(boot["ci"]), "p": test["p"], "significant": stats.significant(test["p"])}
  if all("nll_sum" in x for x in a + b):  # a teacher-forced domain: its answer NLL moves too
    nll = _boot(_arrays(res, a, b, "nll"))
    out.update(nll_change=nll["change"], nll_ci=list(nll["ci"]), nll_p=nll["p"])
  return out


def equivalence(ref_row: dict, row: dict, domains: Sequence[str] | None = None, *,
                margin_points: float = POINTS_MARGIN, margin_nats: float = NLL_MARGIN) -> dict[str, Any]:
  """"row is equivalent to ref" as one claim over its domains: per domain TOST on the common items (rates at
  +-margin_points, per-token NLL at +-margin_nats; the same resampling as compare), the TOST p values Holm-adjusted
  across the claim's domains, equivalent where the adjusted p < 0.05. Returns {domains: {name: {n, change, ci90,
  margin, p, p_holm, equivalent}}, all_equivalent, margins}. Domains without per-item outcomes are listed in
  `untested` (never counted as equivalent)."""
  names = [d for d in (domains or row.get("domains", {})) if d in ref_row.get("domains", {})]
  out, untested = {}, []
  for name in names:
    ref, res = ref_row["domains"][name], row["domains"].get(name)
    pairs = _paired(ref, res) if res else None
    if pairs is None:
      untested.append(name)
      continue
    d = _arrays(res, *pairs)
    margin = margin_nats if d["kind"] == "nll" else margin_points
    t = stats.tost_paired(d["a"], d["b"], margin, weights_a=d["weights_a"], weights_b=d["weights_b"],
                          strata=d["strata"], clusters=d["clusters"])
    out[name] = {k: t[k] for k in ("n", "change", "ci90", "margin", "p")}
  adjusted = stats.holm([v["p"] for v in out.values()]) if out else []
  for v, q in zip(out.values(), adjusted):
    v.update(p_holm=q, equivalent=bool(q < stats.ALPHA))
  return {"domains": out, "untested": untested, "all_equivalent": bool(out) and not untested and
          all(v["equivalent"] for v in out.values()),
          "margins": {"points": margin_points, "nats": margin_nats}, "correction": "holm"}


def overall_paired(ref_row: dict, row: dict, domains: Sequence[str] | None = None) -> dict[str, Any] | None:
  """"Overall" as a paired test of row against ref: each domain's change on its common items (rates in points,
  NLL per token with its sign flipped, so positive is better) divided by that domain's scale, the standard
  deviation of both rows' per-item outcomes pooled (fixed, not resampled), averaged over the domains with equal
  weight; the interval from a bootstrap that resamples each domain within itself (and by cluster or stratum where
  the domain has them), p from a paired permutation test (stats.standardised_gain). None when no domain has
  per-item outcomes in both rows."""
  names = [d for d in (domains or row.get("domains", {})) if d in ref_row.get("domains", {})]
  parts = []
  for name in names:
    res = row["domains"].get(name)
    pairs = _paired(ref_row["domains"][name], res) if res else None
    if pairs is None:
      continue
    d = _arrays(res, *pairs)
    pooled = np.concatenate([np.asarray(d["a"], np.float64), np.asarray(d["b"], np.float64)])
    parts.append(dict(d, name=name, scale=float(pooled.std())))
  if not parts:
    return None
  g = stats.standardised_gain(parts)
  return {"gain": g["gain"], "ci": list(g["ci"]), "p": g["p"], "significant": stats.significant(g["p"]),
          "per_domain": g["per_domain"], "constant": g["constant"], "domains": [p["name"] for p in parts],
          "unit": "pooled per-item standard deviations, positive = better"}


def slim(row: dict) -> dict:
  """A model's evaluation row for a results file: every domain's scores and per-item outcomes (so any later
  comparison can be paired), without the generated replies and samples that make it large."""
  def domain(res: dict) -> dict:
    out = {k: v for k, v in res.items() if k not in ("samples", "items", "apart")}
    out["items"] = [{k: v for k, v in it.items() if k != "response"} for it in res.get("items", [])]
    if "apart" in res:
      out["apart"] = {g: dict(a, items=[{k: v for k, v in it.items() if k != "response"} for it in a["items"]])
                      for g, a in res["apart"].items()}
    return out
  return {k: v for k, v in row.items() if k != "domains"} | {
      "domains": {d: domain(res) for d, res in row.get("domains", {}).items()}}


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
  paired = len(rows) > 1
  lines = ["| model | " + " | ".join(domains) + " | overall |" + (" overall vs first, paired |" if paired else ""),
           "|---" * (len(domains) + 2 + paired) + "|"]
  ref_row = rows[0] if rows else None
  for r in rows:
    tests = compare(ref_row, r) if ref_row is not None and r is not ref_row else {}
    cells = [cell(r["domains"].get(d), ref_row["domains"].get(d) if ref_row else None, tests.get(d))
             for d in domains]
    overall = r.get("overall", float("nan"))
    overall = float("nan") if overall is None else overall
    line = f"| {r['name']} | " + " | ".join(cells) + f" | {overall:.1f}{_fmt_ci(r.get('overall_ci'))} |"
    if paired:
      g = overall_paired(ref_row, r) if r is not ref_row else None
      text = "ref" if r is ref_row else "–" if g is None else (
          f"{g['gain']:+.2f} [{g['ci'][0]:+.2f}, {g['ci'][1]:+.2f}]" + (MARK if g["significant"] else ""))
      line += f" {text} |"
    lines.append(line)
  note = (f"\n{MARK} p < 0.05 against the first row, paired over the same items (exact McNemar for rates, paired "
          "bootstrap for NLL, by source file where items name one); [a, b] = 95% interval (Wilson for rates, "
          "bootstrap for NLL). overall = the mean of the percentage columns (descriptive, unpaired); overall vs "
          "first = the mean over domains of each domain's paired change in pooled per-item standard deviations "
          "(positive = better; bootstrap stratified by domain).\n" if paired else "")
  return "\n".join(lines) + "\n" + note


# ----------------------------------------------------------------------------------------------------------------
# The pipeline's results files.

def check_same_settings(rows) -> None:
  """Rows of one table must share their eval settings (a resumed run with a changed eval config would mix them)."""
  settings = {json.dumps(r.get("settings", {}), sort_keys=True) for r in rows}
  if len(settings) > 1:
    raise BarError("the table's models were evaluated with different eval settings; delete the eval/ folders made "
                   "with the old settings and run again")


def made_by(config) -> str:
  """The command that ran (recorded by the CLI, overrides included), else the config's own example command."""
  from bar_jax import invocation
  return invocation.command() or config.command


def settings_note(rows) -> str:
  s = rows[0].get("settings", {}) if rows else {}
  return (f"Eval: {s.get('n_per_domain')} held-out items per domain, {s.get('max_new_tokens')} new tokens; "
          "math = exact match %, code/general = per-token NLL (change vs the first row), tool_use = teacher-forced "
          "greedy match of the canonical call %, safety = mean of refusal (harmful) and answer (benign) rates; "
          "overall = mean of the percentage columns.")


def write_table(workdir: str, rows: Sequence[dict], title: str, command: str) -> str:
  """WORKDIR/results.md and results.json from eval.json rows (one per model, each named); returns the table."""
  from bar_jax.io import workdir as workdir_lib
  check_same_settings(rows)
  table = format_table(rows)
  md = (f"# BAR pipeline results: {title}\n\n"
        f"Made by: `{command}`\n\n"
        f"{table}\n{settings_note(rows)}\n")
  workdir_lib.write_text_atomic(os.path.join(workdir, RESULTS_MD), md)
  slim = [{k: v for k, v in r.items() if k != "domains"} | {"domains": {d: {k: x for k, x in res.items()
                                                                          if k != "samples"} | {
      "items": [{k: x for k, x in it.items() if k != "response"} for it in res.get("items", [])]}
                                                                      for d, res in r["domains"].items()}}
          for r in rows]  # per-item outcomes stay (paired tests can be re-run from results.json), replies go
  workdir_lib.write_text_atomic(os.path.join(workdir, RESULTS_JSON),
                                json.dumps({"command": command, "models": slim}, indent=1, default=str))
  return table
