"""Cost ledger: adding domains one at a time (1, 2, 3, 4), BAR (train the new expert + retrain the router) against
monolithic retraining (retrain one dense model on every domain so far), from the artifacts' manifest ledgers.

  python experiments/ledger.py                                        # reads runs/bar_smollm2 (+ runs/baselines)
  python experiments/ledger.py --pipeline_workdir=/tmp/bar --baselines_workdir=/tmp/bl --tag=tiny

BAR's k-th addition costs branch_k's own ledger entry (tokens, FLOPs) plus one router training (the routed
manifest's ledger minus the merged one's: its stratified sample grows with the domains, here capped by max_steps,
so the measured cost is reused for every k). Monolithic retraining at k domains costs k branch-sized token budgets
(the monolithic baseline's measured tokens and FLOPs per token, when runs/baselines has it; else the dense FLOPs
formula) and is paid again at every addition: cumulative sum_j j = quadratic vs BAR's linear.
Writes experiments/results/ledger_smollm2[_tag].md and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOMAINS = ["math", "code", "tool_use", "safety"]


def _manifest(d: str) -> dict:
  with open(os.path.join(d, "manifest.json")) as f:
    return json.load(f)


def own_cost(m: dict) -> tuple[float, float]:
  """An artifact's own spending (its ledger entry under its own fingerprint)."""
  e = m["ledger"]["entries"].get(m["fingerprint"], {})
  return float(e.get("tokens", 0)), float(e.get("flops", 0))


def curves(branch: list[tuple[float, float]], router: tuple[float, float], mono_per_domain: tuple[float, float]
           ) -> dict[str, list[float]]:
  """Cumulative (tokens, FLOPs) after k = 1..N additions. Pure: costs in, curves out."""
  out = {"k": [], "bar_tokens": [], "bar_flops": [], "mono_tokens": [], "mono_flops": []}
  bt = bf = mt = mf = 0.0
  for k, (t, f) in enumerate(branch, 1):
    bt, bf = bt + t + router[0], bf + f + router[1]
    mt, mf = mt + k * mono_per_domain[0], mf + k * mono_per_domain[1]
    for key, v in zip(("k", "bar_tokens", "bar_flops", "mono_tokens", "mono_flops"), (k, bt, bf, mt, mf)):
      out[key].append(v)
  return out


def measure(pipeline_workdir: str, baselines_workdir: str | None):
  branch = [own_cost(_manifest(os.path.join(pipeline_workdir, f"branch_{d}"))) for d in DOMAINS]
  merged = _manifest(os.path.join(pipeline_workdir, "merged"))
  routed_dir = os.path.join(pipeline_workdir, "routed")
  router = (0.0, 0.0)
  if os.path.isfile(os.path.join(routed_dir, "manifest.json")):
    routed = _manifest(routed_dir)
    router = (routed["ledger"]["tokens"] - merged["ledger"]["tokens"],
              routed["ledger"]["flops"] - merged["ledger"]["flops"])
  mono_dir = os.path.join(baselines_workdir or "", "monolithic")
  if baselines_workdir and os.path.isfile(os.path.join(mono_dir, "manifest.json")):
    t, f = own_cost(_manifest(mono_dir))
    mono, source = (t / len(DOMAINS), f / len(DOMAINS)), f"measured ({mono_dir})"
  else:
    from bar_jax.model import transformer
    from bar_jax.model.config import ModelConfig
    base = _manifest(os.path.join(pipeline_workdir, "base"))
    stage = _manifest(os.path.join(pipeline_workdir, f"branch_{DOMAINS[0]}"))["stages"][-1]
    seq_len = stage["config"]["data"]["seq_len"]
    t = sum(b[0] for b in branch) / len(branch)
    mono = (t, t * transformer.train_flops_per_token(ModelConfig.from_dict(base["model"]), seq_len))
    source = "dense FLOPs formula x the branches' mean tokens (no monolithic baseline run found)"
  return branch, router, mono, source


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--pipeline_workdir", default="runs/bar_smollm2")
  ap.add_argument("--baselines_workdir", default="runs/baselines")
  ap.add_argument("--results", default="experiments/results")
  ap.add_argument("--tag", default="")
  a = ap.parse_args(argv)
  branch, router, mono, source = measure(a.pipeline_workdir, a.baselines_workdir)
  c = curves(branch, router, mono)
  stem = os.path.join(a.results, "ledger_smollm2" + (f"_{a.tag}" if a.tag else ""))
  os.makedirs(a.results, exist_ok=True)
  cmd = " ".join(["python experiments/ledger.py"] + (argv if argv is not None else sys.argv[1:]))
  lines = ["# Cumulative cost of adding domains one at a time: BAR vs monolithic retraining\n",
           f"Made by: `{cmd}`\n", f"Monolithic cost per domain-unit: {source}. Router per addition: "
           f"{router[0]:.3g} tokens, {router[1]:.3g} FLOPs.\n",
           "| domains | BAR tokens | monolithic tokens | BAR FLOPs | monolithic FLOPs | mono/BAR (FLOPs) |",
           "|---|---|---|---|---|---|"]
  for i, k in enumerate(c["k"]):
    lines.append(f"| {k} ({DOMAINS[i]}) | {c['bar_tokens'][i]:.3g} | {c['mono_tokens'][i]:.3g} | "
                 f"{c['bar_flops'][i]:.3g} | {c['mono_flops'][i]:.3g} | {c['mono_flops'][i] / c['bar_flops'][i]:.2f} |")
  md = "\n".join(lines) + "\n"
  with open(stem + ".md", "w") as f:
    f.write(md)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, what in zip(axes, ("tokens", "flops")):
    ax.plot(c["k"], c[f"bar_{what}"], "o-", label="BAR (new expert + router)")
    ax.plot(c["k"], c[f"mono_{what}"], "s-", label="monolithic retraining")
    ax.set_xlabel("domains added")
    ax.set_ylabel(f"cumulative {what}")
    ax.set_xticks(c["k"])
    ax.legend()
  fig.suptitle("Cost of adding domains one at a time (from the artifacts' ledgers)")
  fig.tight_layout()
  fig.savefig(stem + ".png", dpi=110)
  print(md)


if __name__ == "__main__":
  main()
