"""BAR against its baselines on SmolLM2-135M-Instruct: the paper's main table in miniature.

  python experiments/run_baselines.py                      # default: after (or including) the default pipeline run
  python experiments/run_baselines.py --variant=quick      # plumbing demo
  python experiments/run_baselines.py --variant=tiny --workdir=/tmp/bl --pipeline_workdir=/tmp/bar   # seconds
  python experiments/run_baselines.py --variant=tiny --domains=math,code --eval_domains=code --bar=false \
      --workdir=/tmp/bl                                    # the baselines alone, two domains (the test's command)

Runs (every step under the workdir contract, bar_jax/io/workdir.py, as the pipeline's steps: a step whose folder
holds a finished output of the same identity is skipped, one killed half-way resumes from its checkpoints, and one
whose folder records another identity is moved aside to <step>.stale[N] (kept) and run again):
  the BAR pipeline (configs/bar_smollm2.py:<variant>, --domains) -> rows base (dense start), branch_<d>
    (specialists), bar; with --bar=false the pipeline is not run and the rows start at the base it names;
  experiments/baselines/dense_domain.py per domain   dense fine-tunes (train_lm stage; inputs of the next three);
  experiments/baselines/monolithic.py         one dense model on all domains mixed, same total tokens (train_lm);
  experiments/baselines/sequential.py         the domains one after another, a row after each domain (train_lm);
  experiments/baselines/dense_merge.py        uniform average of the dense fine-tunes (transforms/baselines.py);
  experiments/baselines/btx.py                dense fine-tunes' FFNs as experts, shared weights averaged
                                              (transforms/baselines.py), router trained (router stage).
Every model is evaluated by the evaluate stage with the pipeline's eval settings. Writes
experiments/results/bar_smollm2[_<variant>].md (table + the command), .json and .png (grouped bars).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from bar_jax import config_files, stage_configs
from bar_jax.errors import BarError
from bar_jax.evals import report
from bar_jax.io import models
from bar_jax.io import workdir as workdir_lib
from bar_jax.stages import common, pipeline
from bar_jax.transforms import baselines as builders
from experiments.baselines import btx, dense_domain, dense_merge, monolithic, sequential

DOMAINS = ["math", "code", "tool_use", "safety"]
COLUMNS = DOMAINS + ["general"]
BASELINES = ("monolithic", "sequential", "dense_merge", "btx")


# ----------------------------------------------------------------------------------------------------------------
# Steps: a stage run (pipeline.Step) or an artifact built by a pure transform (Built), both by identity.

@dataclasses.dataclass
class Built:
  """An artifact made by a transform from input artifacts, under the workdir contract like a stage's output. Its
  identity is its baseline config plus every input named by fingerprint, so other inputs or settings never reuse it."""
  name: str
  outdir: str
  config: Any                            # the baseline's ConfigDict (stage, builder, ...)
  inputs: dict[str, list[str]]           # role -> input artifact dirs (or packaged names), as the parents
  # {role: [models.Model]} -> (params, ModelConfig, kind, manifest fields)
  build: Callable[[dict[str, list[models.Model]]], tuple[Any, Any, str, dict]]

  def identity(self) -> dict:
    d = dict(stage_configs.strip_runtime(self.config.to_dict()),
             inputs={role: [workdir_lib.input_fingerprint(x) for x in dirs] for role, dirs in self.inputs.items()})
    return json.loads(json.dumps(d, sort_keys=True, default=str))  # as a manifest stores it

  def done(self) -> bool:
    state, found = workdir_lib.recorded(self.outdir)
    return state == workdir_lib.FINISHED and found == self.identity()

  def run(self) -> str:
    ident = self.identity()
    _, found = workdir_lib.recorded(self.outdir)
    if os.path.isdir(self.outdir) and os.listdir(self.outdir) and found != ident:
      stale = workdir_lib.set_aside(self.outdir)
      print(f"[baselines] {self.outdir} was made with another config or other inputs; moved it to {stale}",
            flush=True)
    if workdir_lib.resolve(self.outdir, ident) == workdir_lib.FINISHED:
      return self.outdir
    loaded = {role: [models.load_model(d) for d in dirs] for role, dirs in self.inputs.items()}
    params, cfg, kind, fields = self.build(loaded)
    parents = [dict(m.manifest, role=role) for role, ms in loaded.items() for m in ms]
    like = next(iter(loaded.values()))[0]  # the first input's tokenizer goes with the artifact
    record = {"stage": self.config.stage, "steps": 0, "tokens": 0, "flops": 0}
    return models.write_artifact(self.outdir, like, params, cfg, kind, [record], parents, identity=ident, **fields)


def run_step(step) -> str:
  """A step's output dir: skipped when finished with its identity, else run (another identity is moved aside)."""
  if step.done():
    print(f"[baselines] {step.name}: done, skipped", flush=True)
  else:
    print(f"[baselines] {step.name}: running", flush=True)
    t0 = time.time()
    step.run()
    print(f"[baselines] {step.name}: finished in {time.time() - t0:.0f} s", flush=True)
  return step.outdir


def train(name: str, cfg, base: str, out: str) -> str:
  cfg = config_files.apply_overrides(cfg, {"base": base})
  return run_step(pipeline.Step(name, "train_lm", out, cfg))


def build_dense_merge(pcfg, dense: dict[str, str], base: str, out: str) -> str:
  def build(inputs):
    fine = inputs["parent"]
    return (builders.average_dense([m.params for m in fine]), fine[0].cfg, "dense",
            dict(base_fingerprint=fine[0].manifest["base_fingerprint"], domain="merged"))
  inputs = {"parent": [dense[d] for d in pcfg.domains]}
  return run_step(Built("dense_merge", out, dense_merge.get_config(pcfg), inputs, build))


def build_btx(pcfg, dense: dict[str, str], base: str, out: str) -> str:
  bc = btx.get_config(pcfg)

  def build(inputs):
    (b,) = inputs["base"]
    params, cfg = builders.btx_moe(b.params, [m.params for m in inputs["expert"]], b.cfg, rule=bc.rule)
    return params, cfg, "moe", dict(experts=["anchor"] + list(pcfg.domains), merge_rule=bc.rule,
                                    base_fingerprint=b.manifest["fingerprint"])
  merged = run_step(Built("btx_merged", out, bc, {"expert": [dense[d] for d in pcfg.domains], "base": [base]},
                          build))
  if not (bc.train_router and pipeline.router_enabled(pcfg)):
    return merged
  routed = os.path.join(os.path.dirname(out), "btx")
  return run_step(pipeline.Step("btx", "router", routed, pipeline.router_config(pcfg, merged)))


def evaluate(pcfg, label: str, model: str, edir: str) -> dict:
  """eval.json's row for MODEL with the pipeline's eval settings (the evaluate stage, by identity)."""
  step = pipeline.Step(f"eval/{label}", "eval", edir, pipeline.eval_config(pcfg, model), result_file=common.EVAL_JSON)
  run_step(step)
  with open(os.path.join(edir, common.EVAL_JSON)) as f:
    (row,) = json.load(f)["models"]
  return dict(row, name=label)


def pipeline_config(variant: str, domains: Sequence[str] | None = None, eval_domains: str | None = None):
  """configs/bar_smollm2.py:<variant>, with the runner's domains and eval domains when given."""
  over = {}
  if domains:
    over["domains"] = list(domains)
  if eval_domains:
    over["eval.domains"] = eval_domains
  return config_files.stage_config("bar_smollm2", None if variant == "default" else variant, over)


def run(variant: str, workdir: str, pipeline_workdir: str, results_dir: str, command: str,
        only: Sequence[str] = BASELINES, domains: Sequence[str] | None = None, eval_domains: str | None = None,
        bar: bool = True) -> str:
  unknown = sorted(set(only) - set(BASELINES))
  if unknown:
    raise BarError(f"--only: unknown baselines {unknown}; choose from {', '.join(BASELINES)}")
  pcfg = pipeline_config(variant, domains, eval_domains)
  rows = []
  if bar:
    pipeline.run(pcfg, pipeline_workdir)  # every finished step is skipped
    base = os.path.join(pipeline_workdir, "base")
    for step in pipeline.plan(pcfg, pipeline_workdir):
      if step.kind == "eval":
        with open(os.path.join(pipeline_workdir, step.name, common.EVAL_JSON)) as f:
          rows.append(dict(json.load(f)["models"][0], name=step.name.split("/", 1)[1]))
  else:  # the baselines alone, from the base the pipeline config names, written once as the pipeline writes it
    pipeline.compilation_cache(pcfg, workdir)
    base = run_step(pipeline.Step("base", "base", os.path.join(workdir, "base"),
                                  ml_collections.ConfigDict({"stage": "base", "base": pcfg.base})))

  made = []
  if "monolithic" in only:
    made.append(("monolithic", train("monolithic", monolithic.get_config(pcfg), base,
                                     os.path.join(workdir, "monolithic"))))
  if set(only) & {"sequential", "dense_merge", "btx"}:
    dense = {d: train(f"dense_{d}", dense_domain.get_config(pcfg, d), base, os.path.join(workdir, f"dense_{d}"))
             for d in pcfg.domains}
    if "sequential" in only:
      seq = sequential.get_config(pcfg)
      prev = base
      for i, d in enumerate(seq.order):  # step 1 is the first domain's dense fine-tune itself
        out = dense[d] if i == 0 else os.path.join(workdir, f"sequential_{i + 1}_{d}")
        prev = dense[d] if i == 0 else train(f"sequential_{i + 1}_{d}", seq.steps[d], prev, out)
        made.append((f"sequential_{i + 1}_{d}", prev))
    if "dense_merge" in only:
      made.append(("dense_merge", build_dense_merge(pcfg, dense, base, os.path.join(workdir, "dense_merge"))))
    if "btx" in only:
      made.append(("btx", build_btx(pcfg, dense, base, os.path.join(workdir, "btx_merged"))))
  if not bar:
    made.insert(0, ("base", base))
  for label, model in made:
    rows.append(evaluate(pcfg, label, model, os.path.join(workdir, "eval", label)))
  return write_results(rows, variant, results_dir, command, "bar_smollm2" if bar else "baselines")


# ----------------------------------------------------------------------------------------------------------------
# Results.

def write_results(rows: list[dict], variant: str, results_dir: str, command: str, name: str = "bar_smollm2") -> str:
  report.check_same_settings(rows)
  os.makedirs(results_dir, exist_ok=True)
  stem = os.path.join(results_dir, name + ("" if variant == "default" else f"_{variant}"))
  s = rows[0].get("settings", {})
  caveat = {"tiny": "A random tiny model and 2 training steps per model: this table only shows that every row is "
                    "produced (plumbing), not quality.\n\n",
            "quick": "A few training steps and eval items: a plumbing demo, not a measurement.\n\n"}.get(variant, "")
  md = (f"# BAR vs baselines, SmolLM2-135M-Instruct ({variant})\n\nMade by: `{command}`\n\n{caveat}"
        + report.format_table(rows) +
        f"\nEval: {s.get('n_per_domain')} held-out items per domain, {s.get('max_new_tokens')} new tokens; math = "
        "exact match %, code/general = 100*exp(-NLL), tool_use = teacher-forced call match %, safety = mean of "
        "refusal (harmful) "
        "and answer (benign) rates; overall = mean of the five.\n\nRows: base = dense start; branch_<d> = each "
        "specialist alone; bar = merged + routed; monolithic = one dense model on all domains, same tokens; "
        "sequential_k_<d> = after the k-th domain of sequential training; dense_merge = average of the dense "
        "fine-tunes; btx = dense fine-tunes' FFNs as experts, shared weights averaged, router trained.\n")
  with open(stem + ".md", "w") as f:
    f.write(md)
  with open(stem + ".json", "w") as f:
    json.dump({"command": command, "rows": [{"name": r["name"], "overall": r["overall"],
                                             **{d: r["domains"].get(d, {}).get("score") for d in COLUMNS},
                                             "eval": report.slim(r)}  # per-item outcomes: paired comparisons
                                            for r in rows]}, f, indent=1, default=str)
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
  ap.add_argument("--domains", default="", help="the pipeline's domains (default its config's: " +
                  ",".join(DOMAINS) + "); every baseline uses the same")
  ap.add_argument("--eval_domains", default="", help="the evaluated domains (default the pipeline config's: all)")
  ap.add_argument("--bar", default="true", choices=["true", "false"],
                  help="false: the baselines alone, without the BAR pipeline and its rows")
  a = ap.parse_args(argv)
  suffix = "" if a.variant == "default" else f"_{a.variant}"
  workdir = a.workdir or os.path.join("runs", f"baselines{suffix}")
  pipe = a.pipeline_workdir or os.path.join("runs", f"bar_smollm2{suffix}")
  command = " ".join(["python experiments/run_baselines.py"] + (sys.argv[1:] if argv is None else list(argv)))
  split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
  try:
    run(a.variant, workdir, pipe, a.results, command, split(a.only), split(a.domains), a.eval_domains or None,
        a.bar == "true")
  except BarError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
