"""Issue 4's measurement: math and tool-use branches of SmolLM2-135M-Instruct, `ffn` vs `lora` experts.

  python experiments/branch_ffn_vs_lora.py --workdir=runs/ffn_vs_lora [--domains=math,tool_use] [--sft_steps=60]

For each (domain, kind) it trains a branch (SFT phase only, so every run sees the same data budget) and prints the
domain metric and general-text NLL before and after, the trainable parameter count, the Adam state bytes, and the
step time; the table goes to experiments/results/branch_ffn_vs_lora.md. Re-running skips finished branches.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bar_jax import train  # noqa: E402
from configs import branch  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="runs/ffn_vs_lora")
  ap.add_argument("--domains", default="math,tool_use")
  ap.add_argument("--kinds", default="ffn,lora")
  ap.add_argument("--sft_steps", type=int, default=60)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=192)
  ap.add_argument("--n_eval", type=int, default=32)
  ap.add_argument("--out", default="experiments/results/branch_ffn_vs_lora.md")
  args = ap.parse_args()
  rows = []
  for domain in args.domains.split(","):
    for kind in args.kinds.split(","):
      c = branch.get_config(f"{domain},{kind}" if kind == "lora" else domain)
      c.phase_order = ["sft"]
      c.phases.sft.steps = args.sft_steps
      c.phases.sft.batch_size = args.batch_size
      c.phases.sft.data.seq_len = args.seq_len
      c.eval.n_per_domain = args.n_eval
      wd = os.path.join(args.workdir, f"{domain}_{kind}")
      train.run(c, wd)
      m = json.load(open(os.path.join(wd, "manifest.json")))
      sft = m["stages"][0]
      before, after = m["metrics_before"]["domains"], m["metrics"]["domains"]
      rows.append(dict(domain=domain, kind=kind, metric_before=before[domain]["value"],
                       metric_after=after[domain]["value"], nll_before=before["general"]["value"],
                       nll_after=after["general"]["value"], trainable=sft["trainable_params"],
                       adam_mib=2 * 4 * sft["trainable_params"] / 2**20, step_s=sft["seconds"] / sft["steps"]))
  head = ("| domain | expert | metric before | after | general NLL before | after | change | trainable params "
          "| Adam state MiB | s/step |\n|---|---|---|---|---|---|---|---|---|---|")
  lines = [head] + [
      f"| {r['domain']} | {r['kind']} | {r['metric_before']:.1f} | {r['metric_after']:.1f} | {r['nll_before']:.3f} "
      f"| {r['nll_after']:.3f} | {100 * (r['nll_after'] / r['nll_before'] - 1):+.1f}% | {r['trainable']:,} "
      f"| {r['adam_mib']:.0f} | {r['step_s']:.1f} |" for r in rows]
  table = "\n".join(lines)
  print(table)
  with open(args.out, "w") as f:
    f.write("# Branch experts: ffn vs lora (SmolLM2-135M-Instruct, SFT phase, real data)\n\n")
    f.write(f"Command: `python experiments/branch_ffn_vs_lora.py {' '.join(sys.argv[1:])}`\n\n{table}\n")


if __name__ == "__main__":
  main()
