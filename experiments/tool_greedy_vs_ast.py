"""Tool use scored two ways on the same held-out items: the teacher-forced greedy match of the canonical call (the
tool_use metric, one forward pass: bar_jax/evals/menu.py call_greedy) against BFCL's AST match of a greedily decoded
reply (metric call_match). Their agreement, item by item, is what licenses the cheap metric.

  python experiments/tool_greedy_vs_ast.py --workdir=/tmp/toolval --n=64 --out=experiments/results/tool_greedy_vs_ast

A model that calls no tool scores 0 both ways and agrees trivially, so the model is a tool-use branch trained here
through the branch stage (--sft_steps of 4 x 512-token rows on the tool-use training split: SFT only, the
default run's lr), unless --model names an artifact. Where the two disagree: greedy right / AST wrong cannot happen
under exact greedy decoding (the canonical call is an accepted call) except by argmax ties or float rounding between
the forward and the KV-cache decode; greedy wrong / AST right is a reply spelling an accepted call differently (another
accepted value, argument order, quotes, spacing), which the teacher-forced match does not credit.
Writes OUT.json (every item's two outcomes, the reply and the canonical call) and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def branch_config(steps: int):
  """The tool-use branch this experiment trains (SFT only, 4 x 512 tokens, lr 5e-4, no branch evaluation)."""
  from bar_jax import config_files
  return config_files.stage_config("branch", "tool_use", {
      "phase_order": ["sft"], "general_ratio": 0.25, "eval.domains": "", "eval.before": False,
      "phases.sft.steps": steps, "phases.sft.batch_size": 4, "phases.sft.data.seq_len": 512,
      "phases.sft.opt.lr": 5e-4, "phases.sft.opt.warmup_steps": 2, "phases.sft.checkpoint_every": 4,
      "phases.sft.log_every": 1})


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--model", default="", help="an artifact dir; empty: train a tool-use branch in WORKDIR/branch")
  p.add_argument("--sft_steps", type=int, default=24)
  p.add_argument("--n", type=int, default=64)
  p.add_argument("--max_new_tokens", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--out", default="")
  p.add_argument("--train_only", action="store_true")
  args = p.parse_args(argv)
  command = "python experiments/tool_greedy_vs_ast.py " + " ".join(argv if argv is not None else sys.argv[1:])
  model_dir = args.model
  t0 = time.time()
  if not model_dir:
    from bar_jax.stages import branch
    model_dir = branch.run(branch_config(args.sft_steps), os.path.join(args.workdir, "branch"))
  train_seconds = time.time() - t0
  if args.train_only:
    return 0
  from bar_jax.evals import validation
  from bar_jax.io import models
  model = models.load_model(model_dir)
  t1 = time.time()
  res = validation.greedy_vs_generated(model.params, model.cfg, model.tokenizer, "tool_use", n=args.n,
                                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
  res.update(command=command, model=os.path.basename(os.path.normpath(model_dir)),
             fingerprint=model.manifest.get("fingerprint"), train_seconds=round(train_seconds, 1),
             compare_seconds=round(time.time() - t1, 1))
  md = validation.format_agreement(res, title="Tool use: teacher-forced greedy match vs generative AST match")
  md += f"\nCommand: `{command}`\n"
  print(md, flush=True)
  if args.out:
    with open(args.out + ".json", "w") as f:
      json.dump(res, f, indent=1, default=str)
    with open(args.out + ".md", "w") as f:
      f.write(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
