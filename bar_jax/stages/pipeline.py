"""Stage pipeline: the whole BAR recipe in one command, each step an artifact in WORKDIR/<step>.

  dense base -> WORKDIR/base                       (the base written once as a dense artifact: every branch's parent)
             -> WORKDIR/branch_<domain>  x N       (stages/branch.py: upcycle + adapt on the domain + general data)
             -> WORKDIR/merged                     (stages/merge.py: anchor + N experts, shared weights averaged)
             -> WORKDIR/routed                     (stages/router.py: router-only training on a stratified sample)
             -> WORKDIR/eval/<model>/eval.json     (stages/evaluate.py: every domain's metric on base, branches, BAR)
             -> WORKDIR/results.md, results.json   (the table: rows = models, columns = domains, overall)

Every step follows the workdir contract (bar_jax/io/workdir.py): its folder records the step's stage identity (its
config without run-time knobs, its inputs by fingerprint). A step whose folder holds a finished output of the same
identity is skipped, so a killed pipeline started again with the same command resumes where it stopped, and a step
killed half-way resumes from its own checkpoints. A step whose identity changed (another config, or an input that
was redone) is run again after its old folder is moved aside to <step>.stale[N] (kept, never deleted); the steps
after it then see new inputs and are redone the same way. Every step's config is derived from the stage's own
configs/<stage>.py get_config plus this config's overrides (bar_jax/config_files.py; nothing is re-implemented
here). The time estimates are stages/progress.py's Clock; the table is written by bar_jax/evals/report.py.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from typing import Any

import ml_collections

from bar_jax import schema, stage_configs
from bar_jax.config_files import apply_overrides, stage_available, stage_config
from bar_jax.errors import BarError
from bar_jax.evals import report
from bar_jax.io import workdir as workdir_lib
from bar_jax.stages.progress import Clock, duration


# ----------------------------------------------------------------------------------------------------------------
# Steps.

@dataclasses.dataclass
class Step:
  name: str                      # also the output's directory under WORKDIR
  kind: str                      # base | branch | merge | router | eval
  outdir: str
  config: Any                    # the stage config (config.stage names the stage; "base" is the pipeline's own)
  train_steps: int = 0           # for the time estimate
  tokens_per_step: int = 0
  result_file: str = workdir_lib.MANIFEST  # what marks the step finished (and records its identity)

  def identity(self) -> dict:
    """Computed when asked: a step's inputs are the outputs of the steps before it."""
    return stage_configs.identity(self.config)

  def done(self) -> bool:
    """A finished output whose identity (migrated when older code stored it) is this step's."""
    state, found = stage_configs.recorded(self.outdir, self.result_file)
    return state == workdir_lib.FINISHED and found == self.identity()

  def run(self) -> str:
    """Runs the step's stage; a folder of another identity (or of none) is moved aside first, never deleted."""
    _, found = stage_configs.recorded(self.outdir, self.result_file)
    if os.path.isdir(self.outdir) and os.listdir(self.outdir) and found != self.identity():
      stale = workdir_lib.set_aside(self.outdir)
      print(f"[pipeline] {self.outdir} was made with another config or other inputs; moved it to {stale} and "
            "running the step again", flush=True)
    if self.config.stage == "base":
      return _write_base(self.config, self.outdir)
    # The stage module directly: bar_jax.train may be __main__ (importing it again redefines its flags).
    return importlib.import_module(f"bar_jax.stages.{self.config.stage}").run(self.config, self.outdir)


def _phase_budget(config) -> tuple[int, int]:
  """(train steps, tokens per step averaged) of a branch/router/train_lm config."""
  steps = tokens = 0
  for name in config.phase_order:
    p = config.phases[name]
    if name == "rl":
      steps += p.steps
      tokens += p.steps * p.prompts_per_step * p.group_size * p.max_response_len
    else:
      steps += p.steps
      tokens += p.steps * p.batch_size * p.data.seq_len
  return steps, (tokens // steps if steps else 0)


def branch_config(config, domain: str, base_dir: str) -> ml_collections.ConfigDict:
  # configs/branch.py:<domain>[,flags]: a built-in's own defaults, a spec file's the generic ones (SFT only).
  arg = ",".join(x for x in (domain, config.branch.arg) if x)
  bc = stage_config("branch", arg, config.branch.overrides)
  bc.capability = domain
  bc.base = base_dir
  bc.checkpoint_fallback = config.checkpoint_fallback  # run-time: the pipeline's, for every step that trains
  for name, phase_over in config.branch.phases.items():
    if name in bc.phases:
      bc.phases[name] = apply_overrides(bc.phases[name], phase_over)
  bc.eval = ml_collections.ConfigDict(dict(bc.eval.to_dict(), domains=[], before=False))  # the pipeline evaluates
  return bc


def router_config(config, merged_dir: str) -> ml_collections.ConfigDict:
  rc = stage_config("router", config.router.arg or None, config.router.overrides)
  rc.model = merged_dir
  rc.checkpoint_fallback = config.checkpoint_fallback
  rc.eval = ml_collections.ConfigDict(dict(rc.eval.to_dict(), domains=[], before=False))  # the pipeline evaluates
  return rc


def eval_config(config, model_spec: str) -> ml_collections.ConfigDict:
  return stage_config("evaluate", None, dict(schema.plain(config.eval), model=model_spec))


def plan(config, workdir: str) -> list[Step]:
  """Every step of the pipeline config, each step's config read into its typed schema (so a bad setting anywhere
  stops here, before any step runs)."""
  from bar_jax.stages import common
  config = stage_configs.load(config)
  base_dir = os.path.join(workdir, "base")
  steps = [Step("base", "base", base_dir, ml_collections.ConfigDict({"stage": "base", "base": config.base}))]
  branch_dirs = []
  from bar_jax.data import capability
  for d in config.domains:  # capability names or spec files: each branch's folder is named by the capability
    bdir = os.path.join(workdir, f"branch_{capability.get(d).name}")
    branch_dirs.append(bdir)
    bc = branch_config(config, d, base_dir)
    n, tps = _phase_budget(bc)
    steps.append(Step(f"branch_{d}", "branch", bdir, bc, n, tps))
  merged = os.path.join(workdir, "merged")
  mc = stage_config("merge", None, config.merge)
  mc.branches = ",".join(branch_dirs)
  mc.base = base_dir
  steps.append(Step("merged", "merge", merged, mc))
  final = merged
  if router_enabled(config):
    routed = os.path.join(workdir, "routed")
    rc = router_config(config, merged)
    n, tps = int(rc.router.max_steps), int(rc.router.batch_size * rc.router.seq_len)  # max_steps 0: no estimate
    steps.append(Step("routed", "router", routed, rc, n, tps))
    final = routed
  for label, spec in eval_models(config, workdir, branch_dirs, merged, final):
    steps.append(Step(f"eval/{label}", "eval", os.path.join(workdir, "eval", label), eval_config(config, spec),
                      result_file=common.EVAL_JSON))
  for step in steps:
    step.config = stage_configs.load(step.config)
  return steps


def evaluate_once(config, model_dir: str, edir: str) -> dict:
  """eval.json's row for model_dir with this run's eval settings (config.eval), evaluated only when EDIR holds no
  eval of this identity (an old one is moved aside). For experiments that add rows to a pipeline run's table."""
  from bar_jax.stages import common
  step = Step(os.path.basename(edir), "eval", edir, eval_config(config, model_dir), result_file=common.EVAL_JSON)
  if not step.done():
    step.run()
  with open(os.path.join(edir, common.EVAL_JSON)) as f:
    (row,) = json.load(f)["models"]
  return row


def router_enabled(config) -> bool:
  """config.router.enabled: True | False | "auto" (run it when bar_jax/stages/router.py and its config exist)."""
  flag = stage_configs.load(config).router.enabled  # typed: the command line's "False" is False
  if flag == "auto":
    return stage_available("router")
  if flag and not stage_available("router"):
    raise BarError("config.router.enabled=True but bar_jax/stages/router.py or configs/router.py is missing; "
                   "pass --config.router.enabled=False to skip router training")
  return bool(flag)


def eval_models(config, workdir: str, branch_dirs: list[str], merged: str, final: str) -> list[tuple[str, str]]:
  """(row label, artifact dir) of every model in the table, in the paper's order: dense start, specialists, BAR."""
  base_dir = os.path.join(workdir, "base")
  rows = [("base", base_dir)]
  if config.eval_branches:  # the specialist rows (:quick leaves them out to stay under 5 minutes)
    rows += [(os.path.basename(b), b) for b in branch_dirs]
  if final != merged and config.eval_merged_before_router:
    rows.append(("bar_merged_unrouted", merged))
  rows.append(("bar", final))
  return rows


def _write_base(config, outdir: str) -> str:
  """The dense base as an artifact in the workdir, so every branch (and the `base`/`ties` merge rules) reads it."""
  from bar_jax.io import models
  config, identity, state = stage_configs.begin(config, outdir)
  if state == workdir_lib.FINISHED:
    return outdir
  base = models.load_model(config.base)
  if base.cfg.ffn != "dense":
    raise BarError(f"config.base {config.base!r} is a {base.cfg.ffn} model; BAR branches from a dense post-trained "
                   "model")
  return models.write_artifact(outdir, base, base.params, base.cfg, "dense", [], [], identity=identity,
                               name=base.manifest.get("name", config.base),
                               source=base.manifest.get("source", config.base),
                               ledger_note="the base's own pre/post-training is outside this ledger")


# ----------------------------------------------------------------------------------------------------------------
# The table.

def table_rows(config, workdir: str) -> list[dict]:
  """The eval.json row of every model in the pipeline's table, in the plan's order, each named by its step."""
  from bar_jax.stages import common
  rows = []
  for step in plan(config, workdir):
    if step.kind != "eval":
      continue
    with open(os.path.join(step.outdir, common.EVAL_JSON)) as f:
      (row,) = json.load(f)["models"]
    row["name"] = step.name.split("/", 1)[1]
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------------------------
# Running.

def compilation_cache(config, workdir: str) -> None:
  """Branches share shapes, so their train steps lower to the same program: a persistent compilation cache turns
  every compile after the first into a cache hit (minutes each on a busy CPU), also across a kill and resume."""
  import jax
  if not jax.config.jax_compilation_cache_dir:
    path = os.path.expanduser(config.compilation_cache or os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)


def run(config, workdir: str) -> str:
  config = stage_configs.load(config)
  if not config.domains:
    raise BarError("config.domains is empty: list the domains to branch, e.g. math,code,tool_use,safety")
  os.makedirs(workdir, exist_ok=True)
  compilation_cache(config, workdir)
  steps = plan(config, workdir)  # every config is built (and checked) before anything runs
  if not router_enabled(config):
    print("[pipeline] router step skipped (config.router.enabled is off or the router stage is not installed): "
          "the merged model keeps the router rows its branches trained", flush=True)
  clock = Clock(config)
  t_start = time.time()
  for i, step in enumerate(steps, 1):
    if step.done():
      print(f"[pipeline {i}/{len(steps)}] {step.name}: done, skipped", flush=True)
      if step.kind != "eval":  # a resumed run estimates from the rates its finished steps measured
        clock.observe(step, 0.0, workdir)
      continue
    what = f"{step.train_steps} train steps" if step.train_steps else step.kind
    if clock.known():
      left = sum(clock.estimate(s) for s in steps[i - 1:] if not os.path.exists(os.path.join(s.outdir,
                                                                                               s.result_file)))
      print(f"[pipeline {i}/{len(steps)}] {step.name}: running ({what}, ~{duration(clock.estimate(step))}); "
            f"~{duration(max(left, clock.estimate(step)))} left in the pipeline", flush=True)
    else:  # the base: the estimate follows from its shape and this machine's measured rate, once it is written
      print(f"[pipeline {i}/{len(steps)}] {step.name}: running ({what})", flush=True)
    t0 = time.time()
    step.run()
    dt = time.time() - t0
    clock.observe(step, dt, workdir)
    print(f"[pipeline {i}/{len(steps)}] {step.name}: finished in {duration(dt)}", flush=True)
  table = report.write_table(workdir, table_rows(config, workdir), config.title, report.made_by(config))
  print(f"[pipeline] all steps complete in {duration(time.time() - t_start)}; table in "
        f"{os.path.join(workdir, report.RESULTS_MD)}\n{table}", flush=True)
  return workdir
