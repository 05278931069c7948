"""Train steps with the FFNs keeping only their input projections for the backward pass (`moe.keep_projections`, the
default) against the same FFNs keeping every intermediate (their undecorated functions), at SmolLM2's shape.

  python experiments/bench_ffn_residuals.py --out=experiments/results/bench_ffn_residuals.md

The steps (dense, 2-expert ffn branch, 2-expert LoRA branch; SFT partition for the branches) run interleaved in one
process (A B, B A, ...), so each ratio is of neighbouring measurements.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train as bt  # noqa: E402
from host import host_line  # noqa: E402
from bar_jax.model import moe, transformer  # noqa: E402
from bar_jax.model.config import Compute  # noqa: E402

FFNS = ((moe, "lora_ffn"), (moe, "dense_dispatch"), (transformer, "swiglu"))
ORIGINAL: dict = {}


def keep_all(on: bool) -> None:
  """Swaps each FFN for its undecorated function (every intermediate kept) or back; the steps trace at construction."""
  for module, name in FFNS:
    kept = ORIGINAL.setdefault(name, getattr(module, name))
    setattr(module, name, kept.__wrapped__ if on else kept)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="4x256")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  b, t = bt._shape(args.shape)
  mesh = bt._mesh_for(1)
  models = {"dense": (bt.SMOLLM2, "dense"), "ffn branch": (bt.SMOLLM2.replace(ffn="moe", n_experts=2), "sft"),
            "lora branch": (bt.SMOLLM2.replace(ffn="moe", n_experts=2, expert_kind="lora"), "sft")}
  runs = {}
  for name, (cfg, stage) in models.items():
    for kept in ("projections", "all"):
      keep_all(kept == "all")
      runs[(name, kept)] = bt.StepRunner(cfg, b, t, mesh=mesh, stage=stage, compute=Compute()).run
  keep_all(False)
  times = bt.interleaved(runs, args.rounds)
  lines = [f"# FFN residuals: projections kept vs every intermediate kept (SmolLM2-135M shape, {args.shape}, "
           "1 device)", "", f"Command: `python experiments/bench_ffn_residuals.py {' '.join(sys.argv[1:])}`  ",
           f"Start: {host_line()}", "",
           "| model | step s, projections kept | step s, all kept | kept / all (median, range) |", "|---|---|---|---|"]
  for name in models:
    st = bt.ratio_stats(times[(name, "projections")], times[(name, "all")])
    lines.append(f"| {name} | {st['num_s']:.2f} | {st['den_s']:.2f} | {bt.fmt_ratio(st)} |")
  for kept in ("projections", "all"):
    st = bt.ratio_stats(times[("lora branch", kept)], times[("ffn branch", kept)])
    lines.append(f"\nlora / ffn branch step, {kept} kept: {bt.fmt_ratio(st)}")
  lines.append(f"\nEnd: {host_line()}")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
