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
configs/<stage>.py get_config plus this config's overrides (nothing is re-implemented here).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from typing import Any

import ml_collections

from bar_jax import schema, stage_configs
from bar_jax.errors import BarError
from bar_jax.io import workdir as workdir_lib
from bar_jax.model.config import ModelConfig

RESULTS_MD, RESULTS_JSON = "results.md", "results.json"


# ----------------------------------------------------------------------------------------------------------------
# Config helpers (also used by experiments/: baselines and sweeps build their configs the same way).

def config_module(name: str):
  """The module configs/<name>.py, imported as the package `configs` (the repository root on the path: run from it,
  or install the checkout with pip install -e .)."""
  try:
    return importlib.import_module(f"configs.{name}")
  except ModuleNotFoundError as e:
    if e.name in ("configs", f"configs.{name}"):
      raise BarError(f"cannot import configs.{name}: run from the repository root (where configs/ is), or pip "
                     "install -e . there") from None
    raise


def stage_config(name: str, arg: str | None = None, overrides: Any = None) -> ml_collections.ConfigDict:
  """configs/<name>.py get_config(arg), updated recursively with `overrides` (a dict or ConfigDict)."""
  try:
    config = config_module(name).get_config(arg)
  except ValueError as e:  # the variant parser's one line
    raise BarError(f"configs/{name}.py:{arg}: {e}") from None
  return apply_overrides(config, overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Any) -> ml_collections.ConfigDict:
  """Recursive update; dotted keys ("phases.sft.steps") are allowed too. Unknown keys raise one line."""
  if not overrides:
    return config
  d = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
  nested = {k: v for k, v in d.items() if "." not in k}
  dotted = {k: v for k, v in d.items() if "." in k}
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy: the caller's config is left alone
  _check_keys(config, nested, "")
  config.update(nested)
  for k, v in dotted.items():
    *parents, last = k.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise BarError(f"override {k!r}: the config has no {p!r}; check the key against configs/*.py")
      node = node[p]
    if last not in node:
      raise BarError(f"override {k!r} is not a key of the stage config; check it against configs/*.py")
    node[last] = v
  return config


def _check_keys(config, d: dict, prefix: str) -> None:
  for k, v in d.items():
    if k not in config:
      raise BarError(f"override {prefix + k!r} is not a key of the stage config; check it against configs/*.py")
    if isinstance(v, dict) and isinstance(config[k], ml_collections.ConfigDict) and v:
      _check_keys(config[k], v, prefix + k + ".")


def stage_available(name: str) -> bool:
  try:
    return (importlib.util.find_spec(f"bar_jax.stages.{name}") is not None
            and importlib.util.find_spec(f"configs.{name}") is not None)
  except ModuleNotFoundError:
    return False


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
  for name, phase_over in config.branch.phases.items():
    if name in bc.phases:
      bc.phases[name] = apply_overrides(bc.phases[name], phase_over)
  bc.eval = ml_collections.ConfigDict(dict(bc.eval.to_dict(), domains=[], before=False))  # the pipeline evaluates
  return bc


def router_config(config, merged_dir: str) -> ml_collections.ConfigDict:
  rc = stage_config("router", config.router.arg or None, config.router.overrides)
  rc.model = merged_dir
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


def check_same_settings(rows) -> None:
  """Rows of one table must share their eval settings (a resumed run with a changed eval config would mix them)."""
  settings = {json.dumps(r.get("settings", {}), sort_keys=True) for r in rows}
  if len(settings) > 1:
    raise BarError("the table's models were evaluated with different eval settings; delete the eval/ folders made "
                   "with the old settings and run again")


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
  from bar_jax.stages import common
  config, identity, state = stage_configs.begin(config, outdir)
  if state == workdir_lib.FINISHED:
    return outdir
  base = common.load_model(config.base)
  if base.cfg.ffn != "dense":
    raise BarError(f"config.base {config.base!r} is a {base.cfg.ffn} model; BAR branches from a dense post-trained "
                   "model")
  return common.write_artifact(outdir, base, base.params, base.cfg, "dense", [], [], identity=identity,
                               name=base.manifest.get("name", config.base),
                               source=base.manifest.get("source", config.base),
                               ledger_note="the base's own pre/post-training is outside this ledger")


# ----------------------------------------------------------------------------------------------------------------
# Progress: what runs, how far, how long to go (from step budgets and the rates measured so far).

def matmul_flops_per_second(n: int = 1024, repeats: int = 5) -> float:
  """This machine's fp32 matmul rate on one device: the best of a few n x n products after a warm-up (~1 s)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


class Clock:
  """How long each step should take, from this machine and this run.

  Until a training step has finished, its seconds per token are the model FLOPs per token of the step's model (the
  base with 2 experts for a branch, N + 1 for the router) over this machine's measured matmul rate times
  config.estimate.fraction_of_peak; afterwards, the rate the finished steps measured. An evaluation is first
  config.estimate.eval_seconds_per_model (timed on a machine of config.estimate.reference_gflops) scaled by this
  machine's rate, afterwards the time the last evaluation took.
  """

  def __init__(self, config):
    self.estimate_config = config.estimate
    self.n_experts = len(config.domains) + 1
    self.flops = None              # matmul FLOP/s, measured when the base's shape is known
    self.base_cfg = None
    self.sec_per_token = None      # measured by a finished training step
    self.eval_seconds = None       # measured by a finished evaluation
    self.other_seconds = float(config.estimate.other_seconds)

  def calibrate(self, base_dir: str) -> None:
    """Reads the base's shape from its manifest and measures the matmul rate (once)."""
    m = _manifest(base_dir)
    if self.flops is None and m.get("model"):
      self.base_cfg = ModelConfig.from_dict(m["model"])
      self.flops = matmul_flops_per_second()
      print(f"[pipeline] this machine: {self.flops / 1e9:.0f} GFLOP/s fp32 matmul on one device; first estimates "
            f"assume {float(self.estimate_config.fraction_of_peak):.0%} of it until a step measures its own rate",
            flush=True)

  def observe(self, step: Step, seconds: float, workdir: str) -> None:
    if step.kind == "base":
      self.calibrate(step.outdir)
    elif step.kind in ("branch", "router") and step.train_steps:
      m = _manifest(os.path.join(workdir, step.name))
      train_s = sum(s.get("seconds", 0) or 0 for s in m.get("stages", []))
      tokens = sum(s.get("tokens", 0) or 0 for s in m.get("stages", []))
      if train_s and tokens:
        self.sec_per_token = train_s / tokens
    elif step.kind == "eval":
      self.eval_seconds = seconds

  def known(self) -> bool:
    return self.flops is not None or self.sec_per_token is not None

  def _flops_per_token(self, step: Step) -> float:
    from bar_jax.model import transformer
    e = 2 if step.kind == "branch" else self.n_experts
    seq = int(step.tokens_per_step or 256)
    return transformer.train_flops_per_token(self.base_cfg.replace(ffn="moe", n_experts=e, top_k=0), seq)

  def estimate(self, step: Step) -> float:
    e = self.estimate_config
    if step.kind == "eval":
      if self.eval_seconds is not None:
        return self.eval_seconds
      return float(e.eval_seconds_per_model) * float(e.reference_gflops) * 1e9 / self.flops
    if not step.train_steps:
      return self.other_seconds
    if self.sec_per_token is not None:
      rate = self.sec_per_token
    else:
      rate = self._flops_per_token(step) / (self.flops * float(e.fraction_of_peak))
    return step.train_steps * step.tokens_per_step * rate + self.other_seconds


def _manifest(d: str) -> dict:
  try:
    with open(os.path.join(d, workdir_lib.MANIFEST)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _fmt(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ----------------------------------------------------------------------------------------------------------------
# The table.

def write_table(config, workdir: str) -> str:
  """WORKDIR/results.md and results.json from the per-model eval.json files (one row per model)."""
  from bar_jax.stages import common
  rows = []
  for step in plan(config, workdir):
    if step.kind != "eval":
      continue
    with open(os.path.join(step.outdir, common.EVAL_JSON)) as f:
      (row,) = json.load(f)["models"]
    row["name"] = step.name.split("/", 1)[1]
    rows.append(row)
  check_same_settings(rows)
  table = common.format_table(rows)
  md = (f"# BAR pipeline results: {config.title}\n\n"
        f"Made by: `{made_by(config)}`\n\n"
        f"{table}\n{settings_note(rows)}\n")
  workdir_lib.write_text_atomic(os.path.join(workdir, RESULTS_MD), md)
  slim = [{k: v for k, v in r.items() if k != "domains"} | {"domains": {d: {k: x for k, x in res.items()
                                                                          if k != "samples"} | {
      "items": [{k: x for k, x in it.items() if k != "response"} for it in res.get("items", [])]}
                                                                      for d, res in r["domains"].items()}}
          for r in rows]  # per-item outcomes stay (paired tests can be re-run from results.json), replies go
  workdir_lib.write_text_atomic(os.path.join(workdir, RESULTS_JSON),
                                json.dumps({"command": made_by(config), "models": slim}, indent=1, default=str))
  return table


def made_by(config) -> str:
  """The command that ran (recorded by the CLI, overrides included), else the config's own example command."""
  from bar_jax import invocation
  return invocation.command() or config.command


def settings_note(rows) -> str:
  s = rows[0].get("settings", {}) if rows else {}
  return (f"Eval: {s.get('n_per_domain')} held-out items per domain, {s.get('max_new_tokens')} new tokens; "
          "math = exact match %, code/general = per-token NLL (change vs the first row), tool_use = teacher-forced "
          "greedy match of the canonical call %, safety = mean of refusal (harmful) and answer (benign) rates; "
          "overall = mean of the percentage columns.")


# ----------------------------------------------------------------------------------------------------------------

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
      print(f"[pipeline {i}/{len(steps)}] {step.name}: running ({what}, ~{_fmt(clock.estimate(step))}); "
            f"~{_fmt(max(left, clock.estimate(step)))} left in the pipeline", flush=True)
    else:  # the base: the estimate follows from its shape and this machine's measured rate, once it is written
      print(f"[pipeline {i}/{len(steps)}] {step.name}: running ({what})", flush=True)
    t0 = time.time()
    step.run()
    dt = time.time() - t0
    clock.observe(step, dt, workdir)
    print(f"[pipeline {i}/{len(steps)}] {step.name}: finished in {_fmt(dt)}", flush=True)
  table = write_table(config, workdir)
  print(f"[pipeline] all steps complete in {_fmt(time.time() - t_start)}; table in "
        f"{os.path.join(workdir, RESULTS_MD)}\n{table}", flush=True)
  return workdir
