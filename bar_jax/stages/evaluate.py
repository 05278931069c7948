"""The evaluate stage: every domain's headline metric on one or more models, side by side.

Reads each model (an artifact dir of any kind — dense, branch, moe — or "smollm2", the packaged base straight from
its GGUF), runs bar_jax.evals.evaluate_model, and writes WORKDIR/eval.json (everything, per model) and
WORKDIR/eval.md (the table: rows = models, columns = domains, overall mean). Returns WORKDIR.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Sequence

from bar_jax.errors import BarError

EVAL_JSON, EVAL_MD = "eval.json", "eval.md"


def _cell(res: dict[str, Any] | None) -> str:
  if not res or not isinstance(res.get("score"), (int, float)) or not math.isfinite(res["score"]):
    return "–"
  if res.get("metric") == "nll":
    return f"{res['score']:.1f} (nll {res['value']:.3f})"
  if "refusal_rate" in res:
    return f"{res['score']:.1f} (ref {res['refusal_rate']:.0f} / ans {res['answer_rate']:.0f})"
  return f"{res['score']:.1f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown table like the paper's: one row per model ({name, domains: {d: result}, overall}), overall last.

  Generative domains show their score (%); NLL domains show 100*exp(-nll) with the NLL beside it; safety shows the
  mean of the refusal rate (harmful prompts) and answer rate (benign prompts) with both beside it.
  """
  domains: list[str] = []
  for r in rows:
    domains += [d for d in r["domains"] if d not in domains]
  lines = ["| model | " + " | ".join(domains) + " | overall |", "|---" * (len(domains) + 2) + "|"]
  for r in rows:
    overall = r.get("overall", float("nan"))
    cells = [_cell(r["domains"].get(d)) for d in domains]
    lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {overall:.1f} |")
  return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def run(config, workdir: str) -> str:
  from bar_jax import evals
  from bar_jax.data import capability
  from bar_jax.stages import common
  specs = [s.strip() for s in str(config.model).split(",") if s.strip()]
  if not specs:
    raise BarError("config.model is empty: pass --config.model=DIR[,DIR2,...] or --config.model=smollm2")
  capability.resolve(config.domains)  # unknown names or bad specs fail before any model is loaded
  for name in (EVAL_JSON, EVAL_MD):
    if os.path.exists(os.path.join(workdir, name)):
      raise BarError(f"{os.path.join(workdir, name)} already exists; use a fresh --workdir (nothing is overwritten)")
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for spec in specs:
    t0 = time.time()
    model = common.load_model(spec)
    cfg = common.model_overrides(model.cfg, config.get("compute", None))
    report = evals.evaluate_model(model.params, cfg, model.tokenizer, config.domains,
                                  n_per_domain=config.n_per_domain, max_new_tokens=config.max_new_tokens,
                                  batch_size=config.batch_size, max_prompt_tokens=config.max_prompt_tokens,
                                  nll_seq_len=config.nll_seq_len, nll_batch_rows=config.nll_batch_rows)
    rows.append({"name": model.manifest.get("name", spec) if spec == common.SMOLLM2 else spec, "model": spec,
                 "kind": model.manifest.get("kind"), "fingerprint": model.manifest.get("fingerprint"),
                 "load_and_eval_seconds": round(time.time() - t0, 2), **report})
    print(f"evaluate: {spec}: overall {report['overall']:.1f} in {report['seconds']:.0f} s", flush=True)
  table = format_table(rows)
  _write_atomic(os.path.join(workdir, EVAL_JSON), json.dumps({"models": rows}, indent=1, default=str))
  _write_atomic(os.path.join(workdir, EVAL_MD), table)
  print(table, flush=True)
  return workdir
