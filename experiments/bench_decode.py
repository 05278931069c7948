"""Decoding speed (the evaluation's cost): greedy KV-cached generation at several batch sizes, as tokens/s and as a
fraction of a matmul of the same shape measured in the same run.

  python experiments/bench_decode.py                                    # the packaged SmolLM2 base, ~3 min
  python experiments/bench_decode.py --models=smollm2,runs/bar_smollm2_quick/routed --rounds=1 \
      --out=experiments/results/bench_decode.md

Per model and batch B: B prompts of --prompt_len tokens, --new_tokens greedy steps (end-of-turn never stops a row:
every row runs every step), best of --rounds after a compiled warm-up. "model GFLOP/s" counts the matmul FLOPs of
the step (2 x active matmul parameters per token: attention projections, the active experts, the LM head);
"of matmul" divides it by the rate of one [B, d_model] x [d_model, 30 * d_ff] product timed in the same process, the
best a decode step of that batch could do with these kernels on this machine.
"""
from __future__ import annotations

import argparse
import os
import time

from experiments.host import host_line


def _best(f, rounds: int) -> float:
  import jax
  jax.block_until_ready(f())
  best = float("inf")
  for _ in range(rounds):
    t = time.perf_counter()
    jax.block_until_ready(f())
    best = min(best, time.perf_counter() - t)
  return best


def _matmul_rate(batch: int, d: int, width: int, rounds: int) -> float:
  import jax
  import jax.numpy as jnp
  x, w = jnp.ones((batch, d), jnp.float32), jnp.ones((d, width), jnp.float32)
  f = jax.jit(lambda x, w: x @ w)
  return 2 * batch * d * width / _best(lambda: f(x, w), rounds)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="smollm2", help="comma-separated: smollm2 or artifact dirs")
  ap.add_argument("--batches", default="16,64")
  ap.add_argument("--prompt_len", type=int, default=40)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)

  from bar_jax.model import generate, transformer
  from bar_jax.stages import common
  from configs.evaluate import get_config
  compute_cfg = get_config().compute
  lines = ["# Decoding speed", "", f"`python experiments/bench_decode.py --models={args.models} "
           f"--batches={args.batches} --prompt_len={args.prompt_len} --new_tokens={args.new_tokens}`", "",
           host_line(), "",
           "| model | batch | tokens/s | model GFLOP/s | matmul GFLOP/s at this batch | of matmul |",
           "|---|---|---|---|---|---|"]
  print("\n".join(lines), flush=True)
  for spec in [s.strip() for s in args.models.split(",") if s.strip()]:
    model = common.load_model(spec)
    cfg, compute = common.model_overrides(model.cfg, compute_cfg)
    flops_per_token = 2 * transformer.active_matmul_params(cfg)
    for batch in [int(b) for b in args.batches.split(",")]:
      prompts = [[1] * args.prompt_len] * batch
      seconds = _best(lambda: generate.generate(model.params, cfg, prompts, max_new_tokens=args.new_tokens,
                                                eos_ids=[-1], pad_id=0, compute=compute), args.rounds)
      tok_s = batch * args.new_tokens / seconds
      mm = _matmul_rate(batch, cfg.d_model, cfg.n_layers * cfg.d_ff, args.rounds + 3)
      line = (f"| {os.path.basename(spec.rstrip('/')) or spec} | {batch} | {tok_s:.0f} | "
              f"{tok_s * flops_per_token / 1e9:.1f} | {mm / 1e9:.1f} | {tok_s * flops_per_token / mm:.2f} |")
      lines.append(line)
      print(line, flush=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
