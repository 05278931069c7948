"""Ablation: GRPO on a math branch with the shared parameters unfrozen (the paper's RLVR) vs frozen (only the domain
expert + router train, FlexOlmo-style; the paper saw a flat reward curve).

  nohup python experiments/rl_frozen_vs_unfrozen.py --steps=8 > runs/rl_ablation.log 2>&1 &

SmolLM2-135M-Instruct (the packaged GGUF) is upcycled to a fresh 2-expert math branch (no mid-training/SFT here:
the branch equals the instruct model), then each arm runs the same GRPO from the same start with the same seed
(so step 1's rollouts are identical). Writes experiments/results/rl_frozen_vs_unfrozen.{json,md}: reward curves
side by side, greedy exact match on held-out easy-math items before and after, time per RL step and rollout
tokens/s. Arms run one after the other in one process; workdirs go under runs/ (kill and re-run: resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np


from bar_jax.io import gguf
from bar_jax import sharding
from bar_jax.stages import rollouts as rl
from bar_jax.transforms import freeze
from bar_jax.transforms.upcycle import upcycle
from configs.rl import rl_config

ARMS = {"unfrozen": list(freeze.SCHEDULE["rl"]), "frozen": list(freeze.SCHEDULE["midtrain"])}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--response_len", type=int, default=32)
  ap.add_argument("--lr", type=float, default=1e-5)
  ap.add_argument("--accum", type=int, default=4)
  ap.add_argument("--eval_n", type=int, default=32)
  ap.add_argument("--arms", default="unfrozen,frozen")
  ap.add_argument("--branch", default="", help="start from this branch artifact (default: a fresh upcycled branch)")
  ap.add_argument("--generators", default="", help="math generators, comma-separated (default: the RL config's)")
  ap.add_argument("--workdir", default="runs/rl_ablation")
  ap.add_argument("--out", default="experiments/results/rl_frozen_vs_unfrozen")
  args = ap.parse_args()

  if args.branch:  # e.g. the pipeline's SFT'd math branch: RL as the paper's last stage of a branch
    from bar_jax.io import models
    m = models.load_model(args.branch)
    if m.cfg.ffn != "moe":
      raise SystemExit(f"--branch={args.branch} is a {m.cfg.ffn} model; pass a branch artifact (or leave it out)")
    params, cfg, tok = m.params, m.cfg, m.tokenizer
    model_note = f"the branch artifact {args.branch} ({m.manifest.get('fingerprint', '')[:12]})"
  else:
    dense_cfg, dense, tok = gguf.load()
    params, cfg = upcycle(dense, dense_cfg)
    params = jax.tree.map(np.asarray, params)
    del dense
    model_note = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised), upcycled to a fresh ffn math branch"
  base = rl_config(steps=args.steps, prompts_per_step=args.prompts, group_size=args.group,
                   max_prompt_len=64, max_response_len=args.response_len, accum=args.accum,
                   checkpoint_every=max(args.steps // 2, 1), eval_n=args.eval_n)
  base.opt.lr = args.lr
  if args.generators:
    base.groups = args.generators.split(",")
  eval_task = rl.capability_task(base, tok, split="eval")
  ev = dict(n=args.eval_n, max_new_tokens=args.response_len, batch_size=32)
  t0 = time.time()
  before = rl.evaluate_task(params, cfg, tok, eval_task, **ev)
  eval_s = time.time() - t0
  print(f"before: {before} ({eval_s:.0f}s)", flush=True)
  results = {"command": "python experiments/rl_frozen_vs_unfrozen.py " + " ".join(sys.argv[1:]),
             "model": model_note,
             "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"{jax.device_count()} {jax.default_backend()} device(s)",
             "config": base.to_dict(), "math_before": before, "arms": {}}
  for arm in args.arms.split(","):
    c = type(base)(dict(base.to_dict(), trainable=ARMS[arm]))
    out, record = rl.run_rl(params, cfg, tok, c, os.path.join(args.workdir, arm), mesh=sharding.make_mesh(),
                            identity={"experiment": "rl_frozen_vs_unfrozen", "arm": arm, "config": c.to_dict()})
    after = rl.evaluate_task(out, cfg, tok, eval_task, **ev)
    print(f"{arm}: curve {record['reward_curve']} after {after}", flush=True)
    results["arms"][arm] = {"trainable": ARMS[arm], "trainable_params": record["trainable_params"],
                            "reward_curve": record["reward_curve"], "math_after": after,
                            "sec_per_step": record["sec_per_step"], "gen_tokens_per_s": record["gen_tokens_per_s"],
                            "rollout_tokens": record["tokens"], "verifier_failures": record["verifier_failures"]}
    del out
    _write(args.out, results)


def _write(out: str, results: dict) -> None:
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(results, f, indent=1)
  arms = results["arms"]
  steps = max(len(a["reward_curve"]) for a in arms.values())
  lines = ["# GRPO on a math branch: shared parameters unfrozen vs frozen", "",
           f"`{results['command']}`  ", f"{results['model']}; {results['machine']}", "",
           "| step | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
  for s in range(steps):
    lines.append(f"| {s + 1} | " + " | ".join(f"{a['reward_curve'][s]:.3f}" if s < len(a["reward_curve"]) else ""
                                              for a in arms.values()) + " |")
  lines += ["", "| arm | trainable params | math before | math after | s / RL step | rollout tokens/s |",
            "|---|---|---|---|---|---|"]
  for name, a in arms.items():
    lines.append(f"| {name} | {a['trainable_params']:,} | {results['math_before']['score']:.1f} | "
                 f"{a['math_after']['score']:.1f} | {a['sec_per_step']:.1f} | {a['gen_tokens_per_s']:.1f} |")
  lines.append(f"\nmath = greedy exact match (%) on the first {results['math_before']['n']} held-out easy-math "
               "items, in the RL prompt format.")
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
