"""Re-evaluate models at the data-driven sizes, one domain at a time, keeping each domain's result as it finishes.

  nice -n 10 python experiments/eval_recheck.py --models=smollm2 --out=runs/eval_recheck          # the base
  python experiments/eval_recheck.py --models=smollm2,runs/bar_smollm2/routed --out=runs/eval_recheck  # + BAR

Each model's domains are written to OUT/<model>/<domain>.json as they finish (a later call skips what is there),
then OUT/eval.json (rows as the evaluate stage writes them) and OUT/eval.md (the table: 95% intervals, every row
tested against the first on the same items). Settings: configs/evaluate.py's defaults unless given.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time


def evaluate_domains(model, cfg, compute, c, names, out_dir: str, label: str) -> dict:
  """{domain: result} of one model, each evaluated with configs/evaluate.py's settings `c` and written to
  OUT_DIR/<domain>.json as it finishes, or read from there when an earlier call wrote it."""
  from bar_jax import evals
  os.makedirs(out_dir, exist_ok=True)
  results = {}
  for name in names:
    path = os.path.join(out_dir, f"{name}.json")
    if not os.path.exists(path):
      t0 = time.time()
      rep = evals.evaluate_model(model.params, cfg, model.tokenizer, [name], n_per_domain=c.n_per_domain,
                                 max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                                 max_prompt_tokens=c.max_prompt_tokens or None, nll_seq_len=c.nll_seq_len,
                                 nll_batch_rows=c.nll_batch_rows, compute=compute)
      with open(path + ".tmp", "w") as f:
        json.dump(dict(rep["domains"][name], settings=rep["settings"]), f, indent=1, default=str)
      os.replace(path + ".tmp", path)
      print(f"{label} {name}: {rep['domains'][name]['value']:.3f} n={rep['domains'][name]['n']} "
            f"in {time.time() - t0:.0f} s", flush=True)
    results[name] = json.load(open(path))
  return results


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="smollm2", help="comma-separated: smollm2, tiny or artifact dirs")
  ap.add_argument("--domains", default="safety,tool_use,math,code,general,instruction_following")
  ap.add_argument("--out", default="runs/eval_recheck")
  ap.add_argument("--n_per_domain", type=int, default=None)
  ap.add_argument("--max_new_tokens", type=int, default=None)
  ap.add_argument("--batch_size", type=int, default=None)
  args = ap.parse_args(argv)

  from bar_jax import evals
  from bar_jax.data import capability
  from bar_jax.evals import report
  from bar_jax.io import models
  from bar_jax.stages import common
  from configs.evaluate import get_config
  c = get_config()
  for k in ("n_per_domain", "max_new_tokens", "batch_size"):
    if getattr(args, k) is not None:
      c[k] = getattr(args, k)
  names = [d.name for d in capability.resolve(args.domains)]
  rows = []
  for spec in [s.strip() for s in args.models.split(",") if s.strip()]:
    mdir = os.path.join(args.out, re.sub(r"[^\w.-]+", "_", spec.strip("/")))
    model = models.load_model(spec)
    cfg, compute = common.model_overrides(model.cfg, c.compute)
    results = evaluate_domains(model, cfg, compute, c, names, mdir, spec)
    overall, overall_ci = evals.runner.overall(results)
    rows.append({"name": model.manifest.get("name", spec), "model": spec, "domains": results, "overall": overall,
                 "overall_ci": overall_ci, "seconds": round(sum(r["seconds"] for r in results.values()), 1)})
  names = [r["name"] for r in rows]
  for r in rows:  # two artifacts of one name (e.g. two runs' `routed`) are told apart by their paths
    if names.count(r["name"]) > 1:
      r["name"] = r["model"]
  table = report.format_table(rows)
  with open(os.path.join(args.out, "eval.json"), "w") as f:
    json.dump({"models": rows}, f, indent=1, default=str)
  with open(os.path.join(args.out, "eval.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
