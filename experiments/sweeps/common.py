"""Shared by the ablation sweeps: build a config from configs/*.py get_config + overrides, run it as a stage step
under the workdir contract (pipeline.Step: reused when finished with the same identity, moved aside and made again
when its settings or inputs changed), evaluate it with the pipeline's eval settings the same way, and append a
markdown table to experiments/results/ablations_smollm2[_<variant>].md with the command that made it."""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bar_jax import config_files  # noqa: E402
from bar_jax.evals import report  # noqa: E402
from bar_jax.stages import common, pipeline  # noqa: E402


def args(doc: str, domain: str = "tool_use"):
  ap = argparse.ArgumentParser(description=doc.split("\n")[0])
  ap.add_argument("--variant", default="default", choices=["default", "quick", "table", "tiny"])
  ap.add_argument("--domain", default=domain, help="the branch domain the ablation trains")
  ap.add_argument("--pipeline_workdir", default=None, help="the BAR run whose base/branches are reused")
  ap.add_argument("--workdir", default=None, help="the sweep's artifacts (default runs/sweeps[_<variant>])")
  ap.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"))
  a = ap.parse_args()
  suffix = "" if a.variant == "default" else f"_{a.variant}"
  a.pipeline_workdir = a.pipeline_workdir or os.path.join("runs", f"bar_smollm2{suffix}")
  a.workdir = a.workdir or os.path.join("runs", f"sweeps{suffix}")
  a.pcfg = config_files.stage_config("bar_smollm2", None if a.variant == "default" else a.variant)
  pipeline.compilation_cache(a.pcfg, a.pipeline_workdir)  # same shapes as the pipeline's: reuse its compiles
  a.command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
  return a


def run_step(step) -> str:
  """A stage run under the workdir contract (pipeline.Step): a finished output of the same identity is reused, one
  of another identity (other settings or inputs) is moved aside and made again, a started one resumes."""
  if not step.done():
    print(f"[sweep] {step.name}", flush=True)
    step.run()
  return step.outdir


def base_dir(a) -> str:
  """The pipeline's base artifact (the pipeline's first step, run if not finished with its identity)."""
  return run_step(pipeline.plan(a.pcfg, a.pipeline_workdir)[0])


def branch(a, name: str, overrides: dict) -> str:
  """One branch of a.domain with the pipeline's recipe plus `overrides` (e.g. {"general_ratio": 0.5})."""
  cfg = config_files.apply_overrides(pipeline.branch_config(a.pcfg, a.domain, base_dir(a)), overrides)
  return run_step(pipeline.Step(name, "branch", os.path.join(a.workdir, name), cfg))


def stage(a, name: str, stage_name: str, overrides: dict) -> str:
  cfg = config_files.stage_config(stage_name, None, overrides)
  return run_step(pipeline.Step(name, stage_name, os.path.join(a.workdir, name), cfg))


def evaluate_row(a, label: str, spec: str, domains, model_overrides: dict | None = None) -> dict:
  """The evaluate stage's row for `spec` (made again when its settings, domains or model changed)."""
  out = os.path.join(a.workdir, "eval", label)
  cfg = pipeline.eval_config(a.pcfg, spec)
  cfg.domains = ",".join(domains)
  if model_overrides:
    cfg.moe.update(model_overrides)  # routing: top_k, norm_topk
  run_step(pipeline.Step(label, "eval", out, cfg, result_file=common.EVAL_JSON))
  with open(os.path.join(out, common.EVAL_JSON)) as f:
    return dict(json.load(f)["models"][0], name=label)


def append(a, title: str, rows: list[dict], note: str = "") -> str:
  os.makedirs(a.results, exist_ok=True)
  path = os.path.join(a.results, "ablations_smollm2" + ("" if a.variant == "default" else f"_{a.variant}") + ".md")
  text = f"\n## {title}\n\nMade by: `{a.command}`\n\n{report.format_table(rows)}\n{note}\n"
  with open(path, "a") as f:
    f.write(text)
  print(text, flush=True)
  return path
