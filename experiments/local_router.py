"""Local router update vs full router retraining after an upgrade (goes beyond the paper).

  python experiments/local_router.py --model=runs/moe_routed --branch=runs/branch_tool_use_v2 --workdir=runs/local_cmp
  python experiments/local_router.py --tiny_moe=DIR --tiny_branch=DIR ...   # any artifacts; configs/upgrade.py:tiny

Runs the upgrade stage twice on the same swap: router_update=full (every router column, the stratified sample of all
domains) and router_update=local (only the new expert's column; the new domain's data plus a replay_fraction sample
of the others). Compares per-domain eval metrics, the routing summary (layer-mean top-1 share per domain and expert)
and the router training cost (steps, tokens, FLOPs, seconds). Writes experiments/results/local_router_<name>.json/.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys



def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", required=True)
  ap.add_argument("--branch", required=True)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--mode", default="replace")
  ap.add_argument("--tiny", action="store_true", help="configs/upgrade.py:tiny settings (tests, seconds)")
  ap.add_argument("--max_steps", type=int, default=0)
  ap.add_argument("--replay_fraction", type=float, default=0.01)
  ap.add_argument("--eval_domains", default="auto")
  ap.add_argument("--n_per_domain", type=int, default=16)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = ap.parse_args(argv)

  from bar_jax import train
  from bar_jax.io import artifact
  from configs import upgrade as upgrade_config
  runs = {}
  for update in ("full", "local"):
    c = upgrade_config.get_config("tiny" if args.tiny else None)
    c.model, c.branch, c.mode, c.router_update = args.model, args.branch, args.mode, update
    c.local.replay_fraction = args.replay_fraction
    if args.max_steps:
      c.router.max_steps = args.max_steps
    c.eval.domains, c.eval.n_per_domain, c.eval.before = args.eval_domains, args.n_per_domain, False
    out = train.run(c, os.path.join(args.workdir, update))
    m = artifact.read_manifest(out)
    rec = m["stages"][-1]
    runs[update] = {"dir": out, "metrics": {d: r.get("value") for d, r in m.get("metrics", {}).get("domains",
                                                                                                     {}).items()},
                    "overall": m.get("metrics", {}).get("overall"), "routing": m.get("routing", {}),
                    "cost": {k: rec.get(k) for k in ("steps", "tokens", "flops", "seconds", "trainable_params")},
                    "data": rec.get("data", {}).get("examples")}
  name = os.path.basename(os.path.normpath(args.branch))
  lines = [f"# local vs full router update: {name}\n", "| update | " + " | ".join(runs["full"]["metrics"]) +
           " | overall | steps | tokens | trainable router params |", "|---" * (len(runs["full"]["metrics"]) + 5) + "|"]
  for u, r in runs.items():
    cells = " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r["metrics"].values())
    lines.append(f"| {u} | {cells} | {r['overall']} | {r['cost']['steps']} | {r['cost']['tokens']:.0f} | "
                 f"{r['cost']['trainable_params']} |")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"local_router_{name}.json"), "w") as f:
    json.dump({"command": "python experiments/local_router.py " + " ".join(argv or sys.argv[1:]), "runs": runs}, f,
              indent=1, default=str)
  with open(os.path.join(args.out, f"local_router_{name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
