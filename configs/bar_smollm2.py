"""The whole BAR pipeline on SmolLM2-135M-Instruct: base -> 4 branches -> merge -> router -> evaluation table.

  python -m bar_jax.train --config=configs/bar_smollm2.py --workdir=runs/bar_smollm2   # ~1 h on a 2-core CPU
  python -m bar_jax.train --config=configs/bar_smollm2.py:quick --workdir=runs/bar_quick  # plumbing demo, < 5 min
  python -m bar_jax.train --config=configs/bar_smollm2.py:table --workdir=runs/table  # issue 16's budgets, ~20 CPU-h
  python -m bar_jax.train --config=configs/bar_smollm2.py:tiny --workdir=/tmp/bar_tiny        # tests: random model

Expected: WORKDIR/{base, branch_math, branch_code, branch_tool_use, branch_safety, merged, routed} artifacts, one
WORKDIR/eval/<model>/eval.json per model, and WORKDIR/results.md: rows base, branch_<domain> x 4,
bar_merged_unrouted (default only), bar; columns math, code, tool_use, safety, general, overall, each with
its 95% interval and a paired test against the base. The default run is a short demonstration (SFT only, 20 steps of
8 x 256 tokens per branch, 8 router steps, 16 eval items per domain). Re-evaluated at 64 items per kind
(experiments/results/eval_recheck.md, 2026-11-30), its routed MoE against the base (paired, n = 64; safety 128):
tool use 0.0 -> 23.4 [14.7, 35.1] (15 items gained, none lost, p = 0.0001), code NLL -0.140 [-0.165, -0.117] and
general NLL -0.026 [-0.046, -0.008] nats per token (p <= 0.001), math unchanged (0.0 [-6.2, +6.2]), safety 62.5 ->
53.9 (change -8.6 [-15.8, -1.4], p = 0.052; benign prompts answered 92% -> 72%), router weights nearly uniform;
`:table` runs the budgets meant for evidence.
Kill it at any point and run the same command again: finished steps are skipped and the running one resumes from
its checkpoint. `:quick` only demonstrates the plumbing
(2 steps of 2 x 256 tokens per branch, 2 eval items per domain, rows base and bar; ~5 min from a fresh workdir on 2
cores): its table shows no reliable gains.
Knobs: --config.domains (which branches), --config.branch.arg=lora (adapter experts), --config.merge.rule=base,
--config.merge.moe.top_k=2, --config.router.enabled=False (skip router training).
"""
import ml_collections

from configs.common import parse_arg


def get_config(arg=None):
  variant = parse_arg(arg, positional=["variant"], choices={"variant": ("default", "quick", "table", "tiny")},
                      variant="default").variant
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"
  c.title = f"SmolLM2-135M-Instruct, {variant}"
  c.command = ("python -m bar_jax.train --config=configs/bar_smollm2.py" + (f":{arg}" if arg else "")
               + f" --workdir=runs/bar_smollm2{'' if variant == 'default' else '_' + variant}")
  c.base = "smollm2"
  c.domains = ["math", "code", "tool_use", "safety"]

  # Branches: configs/branch.py get_config("<domain>,<arg>") + these overrides (phases by name).
  c.branch = ml_collections.ConfigDict()
  c.branch.arg = ""                  # "lora" for adapter experts
  # SFT only (no mid-training phase), activation remat and 2 micro-batches: fewer compilations and half the
  # activation memory
  # on a shared 2-core CPU (8 x 256 in one micro-batch was OOM-killed at 6.3 GB beside other jobs).
  c.branch.overrides = ml_collections.ConfigDict({"general_ratio": 0.25, "phase_order": ["sft"],
                                                  "compute": {"remat": "full"}})
  c.branch.phases = ml_collections.ConfigDict({
      "midtrain": dict(steps=8, batch_size=8, data=dict(seq_len=256), opt=dict(lr=3e-4, warmup_steps=2),
                       checkpoint_every=8, log_every=2),
      "sft": dict(steps=20, batch_size=8, accum=2, data=dict(seq_len=256), opt=dict(lr=5e-4, warmup_steps=2),
                  checkpoint_every=5, log_every=1),
  })
  # Merge: configs/merge.py overrides (rule average = base + N branches, as the recipe; top_k 0 = all experts).
  c.merge = ml_collections.ConfigDict({"rule": "average", "moe": {"top_k": 0}})  # the knob the docstring names
  # Router: configs/router.py overrides; "auto" runs it when the router stage is installed.
  c.router = ml_collections.ConfigDict({"enabled": "auto", "arg": "", "overrides": ml_collections.ConfigDict({
      # remat + 2 micro-batches: the 5-expert MoE's router step was OOM-killed at 17 GB without them.
      "compute": dict(remat="full"),
      "router": dict(fraction=0.05, max_steps=8, batch_size=8, accum=2, seq_len=256, checkpoint_every=4,
                     log_every=1, opt=dict(lr=1e-3)),
      "routing": dict(seq_len=128, max_rows=2, batch_size=2)})})
  c.eval_branches = variant != "quick"  # the branch_<domain> rows
  # adds the row bar_merged_unrouted: the table before/after router training
  c.eval_merged_before_router = variant == "default"
  # Evaluation: configs/evaluate.py overrides.
  # drift_base: "" = no drift NLL; "smollm2" = the base's greedy replies to IFBench prompts (bar_jax/evals/drift.py)
  c.eval = ml_collections.ConfigDict(dict(domains="all", n_per_domain=16, max_new_tokens=40, batch_size=16,
                                          nll_seq_len=256, drift_base=""))
  # The progress estimate until this run has timed its own steps (bar_jax/stages/progress.py Clock): training at this
  # fraction of the matmul rate measured at the start (a 2-core CPU's SmolLM2 step reaches ~0.4-0.5); one model's
  # evaluation as timed on a 2-core CPU of ~170 GFLOP/s, scaled by the measured rate.
  c.estimate = ml_collections.ConfigDict(dict(fraction_of_peak=0.4, eval_seconds_per_model=120.0,
                                              reference_gflops=170.0, other_seconds=20.0))
  c.compilation_cache = ""           # "" = WORKDIR/jax_cache; runs of the same shapes can share one
  c.checkpoint_fallback = False      # True: each training step resumes past a damaged latest checkpoint

  if variant == "quick":  # < 5 min on 2 cores: 2 steps of 2 x 256 tokens per branch and the router; base and bar rows
    c.branch.phases.sft.update(dict(steps=2, batch_size=2, accum=1, checkpoint_every=2))
    c.eval.update(dict(n_per_domain=2, max_new_tokens=8, batch_size=2, nll_seq_len=256))
    c.router.overrides.router.update(dict(max_steps=2, batch_size=2, accum=1, checkpoint_every=2))
    c.router.overrides.routing.update(dict(max_rows=1, batch_size=1))
    c.branch.overrides.compute.remat = "none"  # 2 x 256 tokens fit without it
    c.router.overrides.compute.remat = "none"
    c.estimate.eval_seconds_per_model = 20.0
  if variant == "table":  # the budgets of experiments/results/paper_table_plan.md (the paper's-table rows)
    del c.branch.overrides["phase_order"]  # each domain's own phases (configs/branch.py): math, code mid-train first
    c.branch.phases.midtrain.update(dict(steps=100, checkpoint_every=10, log_every=5))
    c.branch.phases.sft.update(dict(steps=200, checkpoint_every=10, log_every=5))
    c.router.overrides.router.update(dict(max_steps=0, checkpoint_every=10, log_every=5))  # 0: 2 epochs of the sample
    c.eval.update(dict(n_per_domain=64, max_new_tokens=256))  # answer budget: the data's 95th percentile, capped
    c.eval_merged_before_router = True
  if variant == "tiny":
    c.base = "tiny"
    c.branch.arg = "tiny"
    c.branch.overrides.compute.remat = "none"
    c.router.arg = "tiny"
    c.router.overrides = ml_collections.ConfigDict({"router": dict(max_steps=2, seq_len=256, checkpoint_every=1,
                                                                         log_every=1, accum=1)})
    c.branch.phases.midtrain.update(dict(steps=2, batch_size=8, data=dict(seq_len=64), checkpoint_every=1,
                                         log_every=1))
    c.branch.phases.sft.update(dict(steps=2, batch_size=8, accum=1, data=dict(seq_len=256), checkpoint_every=1,
                                    log_every=1))
    c.eval.update(dict(n_per_domain=2, max_new_tokens=4, batch_size=8, nll_seq_len=256, max_prompt_tokens=448))
    c.estimate.update(dict(eval_seconds_per_model=5.0, other_seconds=2.0))
  return c
