"""Issue 4's measurement: `ffn` vs `lora` domain experts, trained exactly like a pipeline run's branches.

  python experiments/branch_ffn_vs_lora.py --workdir=runs/bar_smollm2 --domains=math,tool_use   # ~30 min, 2-core CPU

WORKDIR is a finished `configs/bar_smollm2.py` run: its branch_<domain> are the `ffn` experts and eval/ holds their
and the base's scores. For each domain this trains WORKDIR/branch_<domain>_lora with the same config (same data,
steps, batch, learning rate, seed; only the expert kind differs), evaluates it with the run's eval settings, and
writes experiments/results/branch_ffn_vs_lora_<run>.md/.json: the domain metric and general-text NLL of base, ffn
and lora, trainable parameters, Adam state bytes and seconds per step. Re-running skips what is finished.

Expected: a rank-16 lora expert has ~4% of an ffn expert's parameters (3.0M vs 79.6M on SmolLM2; SFT also unfreezes
the 28.3M tied embeddings, so the trainable counts are ~31M vs ~108M) at about the same step time on a CPU (the
adapters are materialised into the stacked (E, D, F) layout each step); whether it matches ffn's domain gain is what
the table measures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys



def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="runs/bar_smollm2", help="a finished bar_smollm2 pipeline run")
  ap.add_argument("--config", default="configs/bar_smollm2.py", help="that run's config (optionally :variant)")
  ap.add_argument("--domains", default="math,tool_use")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = ap.parse_args(argv)

  from bar_jax import config_files, train
  from bar_jax.errors import BarError
  from bar_jax.evals import report
  from bar_jax.io import artifact
  from bar_jax.stages import pipeline
  path, _, variant = args.config.partition(":")
  config = config_files.stage_config(os.path.splitext(os.path.basename(path))[0], variant or None)
  if "lora" in str(config.branch.arg):
    raise BarError("this run's branches are lora already; pass a run made with ffn experts")
  base = os.path.join(args.workdir, "base")
  rows = []
  base_eval = pipeline.evaluate_once(config, base, os.path.join(args.workdir, "eval", "base"))
  for domain in [d.strip() for d in args.domains.split(",") if d.strip()]:
    for kind in ("ffn", "lora"):
      bdir = os.path.join(args.workdir, f"branch_{domain}" + ("_lora" if kind == "lora" else ""))
      if kind == "lora" and not artifact.is_complete(bdir):
        lora_config = config_files.stage_config(os.path.splitext(os.path.basename(path))[0], variant or None)
        lora_config.branch.arg = ",".join(f for f in ("lora", str(config.branch.arg)) if f)
        train.run(pipeline.branch_config(lora_config, domain, base), bdir)
      if not artifact.is_complete(bdir):
        raise BarError(f"{bdir} is not a finished branch: run the pipeline first "
                       f"(python -m bar_jax.train --config={args.config} --workdir={args.workdir})")
      ev = pipeline.evaluate_once(config, bdir, os.path.join(args.workdir, "eval", os.path.basename(bdir)))
      sft = artifact.read_manifest(bdir)["stages"][-1]
      rows.append(dict(domain=domain, kind=kind, base=base_eval["domains"][domain]["score"],
                       after=ev["domains"][domain]["score"], nll_base=base_eval["domains"]["general"]["value"],
                       nll_after=ev["domains"]["general"]["value"], trainable=sft["trainable_params"],
                       adam_mib=2 * 4 * sft["trainable_params"] / 2**20, step_s=sft["seconds"] / sft["steps"],
                       steps=sft["steps"], tokens=sft["tokens"], overall=ev["overall"],
                       eval=report.slim(ev)))  # per-item outcomes: paired comparisons
  head = ("| domain | expert | domain score: base | branch | general NLL: base | branch | change | trainable params "
          "| Adam state MiB | s/step | overall |\n|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [head] + [
      f"| {r['domain']} | {r['kind']} | {r['base']:.1f} | {r['after']:.1f} | {r['nll_base']:.3f} "
      f"| {r['nll_after']:.3f} "
      f"| {100 * (r['nll_after'] / r['nll_base'] - 1):+.1f}% | {r['trainable']:,} | {r['adam_mib']:.0f} "
      f"| {r['step_s']:.1f} | {r['overall']:.1f} |" for r in rows]
  table = "\n".join(lines)
  command = f"python experiments/branch_ffn_vs_lora.py {' '.join(argv if argv is not None else sys.argv[1:])}"
  stem = os.path.join(args.out, f"branch_ffn_vs_lora_{os.path.basename(os.path.normpath(args.workdir))}")
  os.makedirs(args.out, exist_ok=True)
  with open(stem + ".md", "w") as f:
    f.write("# Branch experts: ffn vs lora (SmolLM2-135M-Instruct, real data, the pipeline's branch recipe)\n\n"
            f"Made by: `{command}`\n\n{table}\n\n{report.settings_note([base_eval])}\n")
  with open(stem + ".json", "w") as f:
    json.dump({"command": command, "base_eval": report.slim(base_eval), "rows": rows}, f, indent=1, default=str)
  print(table)


if __name__ == "__main__":
  main()
