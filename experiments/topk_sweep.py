"""Top-k at inference: evaluate one merged MoE with top_k = E, E-1, ..., 1 and record quality vs active parameters.

  python experiments/topk_sweep.py --model=runs/bar_smollm2/routed --n_per_domain=64 --top_ks=5,4
  python experiments/topk_sweep.py --model=runs/moe_routed --domains=tool_use,safety,general --n_per_domain=16

The BAR paper (arXiv 2604.18473): 4 of 5 experts ~ 5 of 5. Each k is the model override top_k (as
--config.moe.top_k would set it; the kept router probabilities are not renormalised, as in the paper's released
checkpoint, unless --norm_topk, which writes its own table, topk_sweep_<name>_norm.md). Settings
are configs/evaluate.py's (sizes and budgets from the data) unless given, so the top_k = E row equals the evaluate
stage's row of the same model. Each (k, domain) result is written to WORKDIR/k<k>/<domain>.json as it finishes and
skipped when the same command runs again. The table, with every row tested against top_k = E on the same items,
goes to experiments/results/topk_sweep_<name>.md; the rows with every item's outcome to WORKDIR/topk.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", required=True, help="an moe artifact dir")
  ap.add_argument("--domains", default="all")
  ap.add_argument("--n_per_domain", type=int, default=None)
  ap.add_argument("--max_new_tokens", type=int, default=None)
  ap.add_argument("--batch_size", type=int, default=None)
  ap.add_argument("--norm_topk", action="store_true")
  ap.add_argument("--top_ks", default="", help="comma-separated k to run (default every k from E down to 1); the "
                  "largest is the reference row")
  ap.add_argument("--workdir", default=None, help="per-(k, domain) results; default runs/topk_sweep/<model path>")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = ap.parse_args(argv)

  from bar_jax import evals
  from bar_jax.data import capability
  from bar_jax.errors import BarError
  from bar_jax.evals import report
  from bar_jax.io import models
  from bar_jax.model import transformer
  from bar_jax.stages import common
  from configs.evaluate import get_config
  from experiments.eval_recheck import evaluate_domains
  c = get_config()
  for k in ("n_per_domain", "max_new_tokens", "batch_size"):
    if getattr(args, k) is not None:
      c[k] = getattr(args, k)
  model = models.load_model(args.model)
  if model.cfg.ffn != "moe":
    raise BarError(f"{args.model} is not an MoE: pass a merge/router/upgrade artifact")
  suffix = "_norm" if args.norm_topk else ""
  workdir = args.workdir or os.path.join("runs", "topk_sweep",
                                         re.sub(r"[^\w.-]+", "_", args.model.strip("/")) + suffix)
  names = [d.name for d in capability.resolve(args.domains)]
  rows = []
  ks = sorted({int(k) for k in args.top_ks.split(",") if k.strip()} or range(1, model.cfg.n_experts + 1),
              reverse=True)
  if ks[0] > model.cfg.n_experts or ks[-1] < 1:
    raise BarError(f"--top_ks={args.top_ks}: each k must be between 1 and the model's {model.cfg.n_experts} experts")
  for k in ks:
    # --norm_topk renormalises the kept experts' weights when experts are dropped; at k = E nothing is dropped and
    # the row is the model as it is (the reference of both tables).
    norm = args.norm_topk and k < model.cfg.n_experts
    cfg, compute = common.model_overrides(model.cfg, dict(c.compute, top_k=k, norm_topk=norm or model.cfg.norm_topk))
    results = evaluate_domains(model, cfg, compute, c, names, os.path.join(workdir, f"k{k}"), f"top_k={k}")
    overall, overall_ci = evals.runner.overall(results)
    active = transformer.active_matmul_params(cfg)
    rows.append({"name": f"top_k={k} ({active / 1e6:.1f}M active)", "top_k": k, "active_matmul_params": active,
                 "domains": results, "overall": overall, "overall_ci": overall_ci,
                 "seconds": round(sum(r["seconds"] for r in results.values()), 1)})
    print(f"top_k={k}: overall {overall:.1f}, {active / 1e6:.1f}M active matmul params", flush=True)
  name = os.path.basename(os.path.normpath(args.model))
  cmd = "python experiments/topk_sweep.py " + " ".join(a for a in (argv or sys.argv[1:]) if not a.startswith("--out"))
  with open(os.path.join(workdir, "topk.json"), "w") as f:
    json.dump({"command": cmd, "model": args.model, "fingerprint": model.manifest.get("fingerprint"), "rows": rows},
              f, indent=1, default=str)
  changes = ["", f"Paired changes against top_k={ks[0]} on the same items (change [95% interval], test p; for "
             "rates the items only the reference got right / only this row got right):", ""]
  for row in rows[1:]:
    for domain, t in report.compare(rows[0], row).items():
      flips = f", {t['a_only']} lost / {t['b_only']} gained" if "a_only" in t else ""
      changes.append(f"- top_k={row['top_k']} {domain}: {t['change']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}], "
                     f"{t['test']} p = {t['p']:.3g}{flips}")
  settings = next(iter(rows[0]["domains"].values())).get("settings", {})
  minutes = sum(r["seconds"] for r in rows) / 60
  text = (f"# top-k sweep: {args.model}\n\n`{cmd}`\n\nModel fingerprint {model.manifest.get('fingerprint')}; "
          f"settings {json.dumps(settings, default=str)}; {minutes:.0f} min of evaluation on "
          f"{os.cpu_count()} CPU cores.\n\n" + report.format_table(rows) + "\n".join(changes) + "\n")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"topk_sweep_{name}{suffix}.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
