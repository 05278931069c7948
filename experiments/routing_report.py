"""Routing diagnostics of any MoE artifact: per domain and layer, the share of tokens each expert gets.

  python experiments/routing_report.py --model=runs/bar_smollm2/merged --out=runs/bar_smollm2/routing_merged

The router stage writes the same report for the model it trains (WORKDIR/routed/routing.json/.png); this script
makes it for any other MoE, e.g. the merged model before router training, for a before/after comparison. It uses
configs/router.py's `routing` settings (held-out conversations per domain, packed edge to edge). Writes
OUT/routing.json and OUT/routing.png and prints the layer-mean table (top-1 share, %); then the mean router weight
of each expert on each domain's tokens in OUT/weights/routing.json and .png, and its table (%).
"""
from __future__ import annotations

import argparse
import os

from bar_jax.errors import run_main  # light: no jax import before the device flags are set


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", required=True, help="an moe artifact directory")
  ap.add_argument("--out", required=True, help="folder for routing.json and routing.png")
  ap.add_argument("--domains", default="math,code,tool_use,safety,general")
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--max_rows", type=int, default=2)
  ap.add_argument("--batch_size", type=int, default=2)
  ap.add_argument("--title", default="", help="the heatmap's title prefix (e.g. 'merged, before router training')")
  args = ap.parse_args(argv)

  from bar_jax.errors import BarError
  from bar_jax.evals import routing as routing_lib
  from bar_jax.io import models
  model = models.load_model(args.model)
  if model.cfg.ffn != "moe":
    raise BarError(f"{args.model} is a {model.cfg.ffn} model: routing diagnostics need an moe artifact")
  names = model.manifest.get("experts") or [f"expert_{i}" for i in range(model.cfg.n_experts)]
  domains = [d.strip() for d in args.domains.split(",") if d.strip()]
  rows = routing_lib.domain_rows(model.tokenizer, domains, seq_len=args.seq_len, max_rows=args.max_rows)
  report = routing_lib.routing_stats(model.params, model.cfg, rows, batch_size=args.batch_size, names=names)
  if args.title:
    report["title"] = args.title
  routing_lib.write(report, args.out)
  print(routing_lib.format_table(report))
  # The mean router weight each expert gets on each domain's tokens (what the model applies; OUT/weights/).
  weights = routing_lib.weight_table(model.params, model.cfg, rows, batch_size=args.batch_size, names=names)
  if args.title:
    weights["title"] = args.title
  routing_lib.write(weights, os.path.join(args.out, "weights"), stat="mean_weight")
  print(routing_lib.format_table(weights, "mean_weight"))


if __name__ == "__main__":
  run_main(main)
