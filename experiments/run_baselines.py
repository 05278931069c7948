"""BAR against its baselines on SmolLM2-135M-Instruct: the paper's main table in miniature.

  python experiments/run_baselines.py                      # default: after (or including) the default pipeline run
  python experiments/run_baselines.py --variant=quick      # plumbing demo
  python experiments/run_baselines.py --variant=tiny --workdir=/tmp/bl --pipeline_workdir=/tmp/bar   # seconds

Runs (each step skipped when its artifact is already complete, so it resumes like the pipeline):
  the BAR pipeline (configs/bar_smollm2.py:<variant>) -> rows base (dense start), branch_<d> (specialists), bar;
  experiments/baselines/dense_domain.py x 4   dense per-domain fine-tunes (inputs of the next three);
  experiments/baselines/monolithic.py         one dense model on all domains mixed, same total tokens;
  experiments/baselines/sequential.py         math -> code -> tool_use -> safety, a row after each domain;
  experiments/baselines/dense_merge.py        uniform average of the dense fine-tunes;
  experiments/baselines/btx.py                dense fine-tunes' FFNs as experts, shared weights averaged, router
                                              trained.
Writes experiments/results/bar_smollm2[_<variant>].md (table + the command) and .png (grouped bars).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from bar_jax.stages import common, pipeline  # noqa: E402
from bar_jax.transforms import merge as merge_lib, upcycle  # noqa: E402

DOMAINS = ["math", "code", "tool_use", "safety"]
COLUMNS = DOMAINS + ["general"]


def baseline_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"baseline_{name}", os.path.join(HERE, "baselines", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ----------------------------------------------------------------------------------------------------------------
# Pure builders (params in, params out).

def average_dense(trees: Sequence[dict]) -> dict:
  """Uniform mean of same-shaped dense parameter dicts, taken in float64 and rounded once."""
  import jax
  return jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x, np.float64) for x in xs]), 0)
                      .astype(np.asarray(xs[0]).dtype), *trees)


def btx_moe(base_params: dict, dense_params: Sequence[dict], cfg) -> tuple[dict, Any]:
  """Each dense fine-tune as a 2-expert branch [base FFN | its FFN] with its own shared weights, then the merge
  transform: anchor = the base FFN, expert i = fine-tune i's FFN, shared weights averaged, router zeros (uniform)."""
  branches, cfgs = [], []
  for p in dense_params:
    with_base_ffn = dict(p, layers=dict(p["layers"], mlp=base_params["layers"]["mlp"]))
    b, bcfg = upcycle.upcycle(with_base_ffn, cfg, expert_init=p)
    branches.append(b)
    cfgs.append(bcfg)
  return merge_lib.merge(None, branches, cfgs, rule="average_branches")  # BTX averages the experts only


# ----------------------------------------------------------------------------------------------------------------
# Steps.

def train(cfg, base_dir: str, out: str) -> str:
  if not common.done(out):
    cfg = pipeline.apply_overrides(cfg, {"base": base_dir})
    print(f"[baselines] training {os.path.basename(out)} ({cfg.phases.sft.steps} steps)", flush=True)
    importlib.import_module("bar_jax.stages.train_lm").run(cfg, out)
  return out


def write_built(out: str, params, cfg, kind: str, parents: list[dict], stage: str, **fields) -> str:
  if common.done(out):
    return out
  like = common.load_model(parents[0]["dir"])
  record = {"stage": stage, "steps": 0, "tokens": 0, "flops": 0}
  manifests = [dict(common.load_model(p["dir"]).manifest, role=p["role"]) for p in parents]
  return common.write_artifact(out, like, params, cfg, kind, [record], manifests, **fields)


BASELINES = ("monolithic", "sequential", "dense_merge", "btx")


def run(variant: str, workdir: str, pipeline_workdir: str, results_dir: str, command: str,
        only: Sequence[str] = BASELINES) -> str:
  unknown = sorted(set(only) - set(BASELINES))
  if unknown:
    raise SystemExit(f"--only: unknown baselines {unknown}; choose from {', '.join(BASELINES)}")
  pcfg = pipeline.stage_config("bar_smollm2", None if variant == "default" else variant)
  pipeline.run(pcfg, pipeline_workdir)  # every finished step is skipped
  base_dir = os.path.join(pipeline_workdir, "base")
  rows = []
  for step in pipeline.plan(pcfg, pipeline_workdir):
    if step.kind == "eval":
      with open(os.path.join(pipeline_workdir, step.name, common.EVAL_JSON)) as f:
        rows.append(dict(json.load(f)["models"][0], name=step.name.split("/", 1)[1]))

  models = []
  if "monolithic" in only:
    models.append(("monolithic", train(baseline_config("monolithic", variant), base_dir,
                                       os.path.join(workdir, "monolithic"))))
  if not set(only) & {"sequential", "dense_merge", "btx"}:  # none of the rest needs the dense fine-tunes
    return _finish(rows, models, pcfg, workdir, variant, results_dir, command)
  dense = {d: train(baseline_config("dense_domain", f"{variant},{d}"), base_dir,
                    os.path.join(workdir, f"dense_{d}")) for d in DOMAINS}
  seq_cfg = baseline_config("sequential", variant)
  seq_dirs, prev = [], base_dir
  for i, d in enumerate(seq_cfg.order if "sequential" in only else []):
    out = dense[d] if i == 0 else os.path.join(workdir, f"sequential_{i + 1}_{d}")  # step 1 = the dense fine-tune
    prev = train(seq_cfg.steps[d], prev, out)
    seq_dirs.append((d, prev))

  base = common.load_model(base_dir)
  fine = [common.load_model(dense[d]) for d in DOMAINS]
  models += [(f"sequential_{i + 1}_{d}", p) for i, (d, p) in enumerate(seq_dirs)]
  merged_dir = os.path.join(workdir, "dense_merge")
  if "dense_merge" in only and not common.done(merged_dir):
    write_built(merged_dir, average_dense([m.params for m in fine]), fine[0].cfg, "dense",
                [{"dir": dense[d], "role": "parent"} for d in DOMAINS], "dense_average",
                base_fingerprint=base.manifest["fingerprint"], domain="merged")
  if "dense_merge" in only:
    models.append(("dense_merge", merged_dir))
  if "btx" not in only:
    return _finish(rows, models, pcfg, workdir, variant, results_dir, command)
  btx_dir = os.path.join(workdir, "btx_merged")
  if not common.done(btx_dir):
    params, cfg = btx_moe(base.params, [m.params for m in fine], base.cfg)
    write_built(btx_dir, params, cfg, "moe", [{"dir": dense[d], "role": "expert"} for d in DOMAINS] +
                [{"dir": base_dir, "role": "base"}], "btx_merge", experts=["anchor"] + DOMAINS,
                base_fingerprint=base.manifest["fingerprint"], merge_rule="average_branches")
  btx_final = btx_dir
  if baseline_config("btx", variant).train_router and pipeline.router_enabled(pcfg):
    btx_final = os.path.join(workdir, "btx")
    if not common.done(btx_final):
      importlib.import_module("bar_jax.stages.router").run(pipeline.router_config(pcfg, btx_dir), btx_final)

  models.append(("btx", btx_final))
  return _finish(rows, models, pcfg, workdir, variant, results_dir, command)


def _finish(rows, models, pcfg, workdir, variant, results_dir, command) -> str:
  for label, spec in models:
    rows.append(dict(pipeline.evaluate_once(pcfg, spec, os.path.join(workdir, "eval", label)), name=label))
  return write_results(rows, variant, results_dir, command)


# ----------------------------------------------------------------------------------------------------------------
# Results.

def write_results(rows: list[dict], variant: str, results_dir: str, command: str) -> str:
  pipeline.check_same_settings(rows)
  os.makedirs(results_dir, exist_ok=True)
  stem = os.path.join(results_dir, "bar_smollm2" + ("" if variant == "default" else f"_{variant}"))
  s = rows[0].get("settings", {})
  caveat = {"tiny": "A random tiny model and 2 training steps per model: this table only shows that every row is "
                    "produced (plumbing), not quality.\n\n",
            "quick": "A few training steps and eval items: a plumbing demo, not a measurement.\n\n"}.get(variant, "")
  md = (f"# BAR vs baselines, SmolLM2-135M-Instruct ({variant})\n\nMade by: `{command}`\n\n{caveat}"
        + common.format_table(rows) +
        f"\nEval: {s.get('n_per_domain')} held-out items per domain, {s.get('max_new_tokens')} new tokens; math = "
        "exact match %, code/general = 100*exp(-NLL), tool_use = call match %, safety = mean of refusal (harmful) "
        "and answer (benign) rates; overall = mean of the five.\n\nRows: base = dense start; branch_<d> = each "
        "specialist alone; bar = merged + routed; monolithic = one dense model on all domains, same tokens; "
        "sequential_k_<d> = after the k-th domain of sequential training; dense_merge = average of the dense "
        "fine-tunes; btx = dense fine-tunes' FFNs as experts, shared weights averaged, router trained.\n")
  with open(stem + ".md", "w") as f:
    f.write(md)
  with open(stem + ".json", "w") as f:
    json.dump({"command": command, "rows": [{"name": r["name"], "overall": r["overall"],
                                             **{d: r["domains"].get(d, {}).get("score") for d in COLUMNS}}
                                            for r in rows]}, f, indent=1)
  plot(rows, stem + ".png", title=f"BAR vs baselines, SmolLM2-135M ({variant})")
  print(md, flush=True)
  return stem + ".md"


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = COLUMNS + ["overall"]
  fig, ax = plt.subplots(figsize=(12, 4.5))
  width = 0.8 / len(rows)
  for i, r in enumerate(rows):
    vals = [r["domains"].get(c, {}).get("score", np.nan) if c != "overall" else r["overall"] for c in cols]
    ax.bar(np.arange(len(cols)) + i * width, vals, width, label=r["name"])
  ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, cols)
  ax.set_ylabel("score")
  ax.set_title(title)
  ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variant", default="default", choices=["default", "quick", "table", "tiny"])
  ap.add_argument("--workdir", default=None, help="baselines' artifacts (default runs/baselines_<variant>)")
  ap.add_argument("--pipeline_workdir", default=None, help="the BAR run (default runs/bar_smollm2[_<variant>])")
  ap.add_argument("--results", default=os.path.join("experiments", "results"))
  ap.add_argument("--only", default=",".join(BASELINES), help="a subset of " + ",".join(BASELINES))
  a = ap.parse_args(argv)
  suffix = "" if a.variant == "default" else f"_{a.variant}"
  workdir = a.workdir or os.path.join("runs", f"baselines{suffix}")
  pipe = a.pipeline_workdir or os.path.join("runs", f"bar_smollm2{suffix}")
  command = " ".join(["python experiments/run_baselines.py"] + (sys.argv[1:] if argv is None else list(argv)))
  run(a.variant, workdir, pipe, a.results, command, [b.strip() for b in a.only.split(",") if b.strip()])


if __name__ == "__main__":
  main()
