"""Top-k at inference: evaluate one merged MoE with top_k = E, E-1, ..., 1 and record quality vs active parameters.

  python experiments/topk_sweep.py --model=runs/moe_routed --domains=tool_use,safety,general --n_per_domain=16

The BAR paper (arXiv 2604.18473): 4 of 5 experts ~ 5 of 5. Each k is the model override top_k (as
--config.compute.top_k would set it; the router's probabilities are kept unnormalised unless --norm_topk). Writes
experiments/results/topk_sweep_<name>.json and .md (one row per k: active matmul params, each domain, overall).
"""
from __future__ import annotations

import argparse
import json
import os
import sys



def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", required=True, help="an moe artifact dir")
  ap.add_argument("--domains", default="all")
  ap.add_argument("--n_per_domain", type=int, default=16)
  ap.add_argument("--max_new_tokens", type=int, default=48)
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--norm_topk", action="store_true")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = ap.parse_args(argv)

  from bar_jax import evals
  from bar_jax.errors import BarError
  from bar_jax.model import transformer
  from bar_jax.stages import common
  from bar_jax.stages.common import format_table
  model = common.load_model(args.model)
  if model.cfg.ffn != "moe":
    raise BarError(f"{args.model} is not an MoE: pass a merge/router/upgrade artifact")
  rows = []
  for k in range(model.cfg.n_experts, 0, -1):
    cfg = common.model_overrides(model.cfg, {"top_k": k, "norm_topk": args.norm_topk})
    report = evals.evaluate_model(model.params, cfg, model.tokenizer, args.domains, n_per_domain=args.n_per_domain,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    active = transformer.active_matmul_params(cfg)
    rows.append({"name": f"top_k={k} ({active / 1e6:.1f}M active)", "top_k": k, "active_matmul_params": active,
                 **report})
    print(f"top_k={k}: overall {report['overall']:.1f}, {active / 1e6:.1f}M active matmul params", flush=True)
  name = os.path.basename(os.path.normpath(args.model))
  os.makedirs(args.out, exist_ok=True)
  cmd = "python experiments/topk_sweep.py " + " ".join(a for a in (argv or sys.argv[1:]) if not a.startswith("--out"))
  with open(os.path.join(args.out, f"topk_sweep_{name}.json"), "w") as f:
    json.dump({"command": cmd, "model": name, "fingerprint": model.manifest.get("fingerprint"), "rows": rows}, f,
              indent=1, default=str)
  with open(os.path.join(args.out, f"topk_sweep_{name}.md"), "w") as f:
    f.write(f"# top-k sweep: {name}\n\n`{cmd}`\n\n" + format_table(rows))


if __name__ == "__main__":
  main()
