"""BAR on the many-capability testbed: SmolLM2-135M-Instruct branched into the first n reasoning-gym testbed
capabilities (configs/capabilities/testbed/, tasks and order: bar_jax/data/sources/rgym_tasks.py), merged into one
MoE [anchor + n experts], its router trained, every model scored on every testbed domain by greedy_match.

  python -m bar_jax.train --config=configs/bar_testbed.py:n=8 --workdir=runs/bar_testbed_8        # LoRA experts
  python -m bar_jax.train --config=configs/bar_testbed.py:n=16,expert=ffn --workdir=runs/bar_testbed_16_ffn
  python -m bar_jax.train --config=configs/bar_testbed.py:n=2,tiny --workdir=/tmp/testbed_tiny  # random model: plumbing

Run from the repository root (the capabilities are named by their spec paths). Expected: WORKDIR/{base,
branch_<task> x n, merged, routed} artifacts, WORKDIR/eval/<model>/eval.json and WORKDIR/results.md: rows base,
branch_<task> x n, bar_merged_unrouted, bar; one column per task (greedy_match % on its first 200 held-out items,
95% interval, paired against the base) and overall. Each branch: 50 SFT steps of 8 rows x 128 tokens (the task's
conversations, 25% general data), LoRA rank 16 (expert=lora, the default: a 17-expert MoE stays affordable on a CPU)
or full FFN copies (expert=ffn).
Measured on a 2-core AMD EPYC (float32, 1 device): one SFT step at 8 x 128 takes 9.5 s with a LoRA expert and
13.3 s with an ffn expert (`python experiments/bench_train.py --sections=peak,lora --devices=1 --lora_shape=8x128
--rounds=2`, idle machine, 141 GFLOP/s matmul), so a branch's 50 steps take ~8 min (LoRA) or ~11 min (ffn); the
base's greedy_match on 200 held-out items took 43-64 s per task on a nearly idle machine (85-200 s beside another
job; `python experiments/testbed_tasks.py --base_items=200`), ~1 min per task and model. Estimate for n = 8, LoRA:
8 branches ~65 min + 11 evaluated models x 8 tasks ~90 min + the router (50 steps of a 9-expert MoE, not timed;
~10 min if a step costs about a branch step) = ~2.7 h on 2 idle cores; --config.eval_branches=False leaves 3
evaluated models (~1.6 h in all). n = 16: ~2.2 h of branches + 19 models x 16 tasks of eval (~5 h; 0.8 h without
the branch rows). One branch with its own evaluation (~10 min) is the minutes-scale unit.
"""
import os

import ml_collections

from configs.common import parse_arg

SPEC_DIR = "configs/capabilities/testbed"  # relative to the repository root: the spec paths enter stage identities


def spec_path(task: str) -> str:
  return os.path.join(SPEC_DIR, f"{task}.py")


def get_config(arg=None):
  from bar_jax.data.sources.rgym_tasks import TESTBED
  a = parse_arg(arg, choices={"n": tuple(range(2, len(TESTBED) + 1)), "expert": ("lora", "ffn")}, n=8,
                expert="lora", tiny=False)
  lora = a.expert == "lora"
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"
  c.title = f"SmolLM2-135M-Instruct on the testbed: {a.n} capabilities, {a.expert} experts"
  c.command = ("python -m bar_jax.train --config=configs/bar_testbed.py" + (f":{arg}" if arg else "")
               + f" --workdir=runs/bar_testbed_{a.n}{'' if lora else '_ffn'}{'_tiny' if a.tiny else ''}")
  c.base = "smollm2"
  c.domains = [spec_path(t) for t in TESTBED[:a.n]]

  # Branches: configs/branch.py get_config("math[,lora]") (the defaults of a spec-file capability) + these.
  c.branch = ml_collections.ConfigDict()
  c.branch.arg = "lora" if lora else ""
  # SFT only; rows of 128 tokens hold every testbed conversation (experiments/results/testbed_tasks.md "row max"),
  # so no remat is needed.
  c.branch.overrides = ml_collections.ConfigDict({"general_ratio": 0.25, "phase_order": ["sft"],
                                                  "compute": {"remat": "none"}})
  c.branch.phases = ml_collections.ConfigDict({
      "sft": dict(steps=50, batch_size=8, accum=1, data=dict(seq_len=128),
                  opt=dict(lr=1e-3 if lora else 5e-4, warmup_steps=5), checkpoint_every=10, log_every=5),
  })
  # Merge: configs/merge.py overrides (anchor + n experts, shared leaves averaged over base and branches; all on).
  c.merge = ml_collections.ConfigDict({"rule": "average", "moe": {"top_k": 0}})
  # Router: configs/router.py overrides; "auto" runs it when the router stage is installed.
  c.router = ml_collections.ConfigDict({"enabled": "auto", "arg": "", "overrides": ml_collections.ConfigDict({
      "compute": dict(remat="none"),
      # Routing defaults (the router's initialisation and the like) are being added to configs/router.py's
      # `router` section by another change: set them here, in c.router.overrides.router, once they exist.
      "router": dict(fraction=0.05, max_steps=50, batch_size=8, accum=1, seq_len=128, checkpoint_every=10,
                     log_every=5, opt=dict(lr=1e-3)),
      "routing": dict(seq_len=128, max_rows=2, batch_size=2)})})
  c.eval_branches = True               # the branch_<task> rows: each specialist on every task
  c.eval_merged_before_router = True   # the row bar_merged_unrouted: the table before/after router training
  # Evaluation: configs/evaluate.py overrides. greedy_match needs no decoding: the NLL rows carry every item
  # (nll_seq_len x nll_batch_rows tokens per forward).
  c.eval = ml_collections.ConfigDict(dict(domains=",".join(c.domains), n_per_domain=200, max_new_tokens=16,
                                          batch_size=16, nll_seq_len=512, nll_batch_rows=4))
  # The progress estimate until this run has timed its own steps (bar_jax/stages/progress.py Clock).
  c.estimate = ml_collections.ConfigDict(dict(fraction_of_peak=0.4, eval_seconds_per_model=60.0 * a.n,
                                              reference_gflops=170.0, other_seconds=20.0))
  c.compilation_cache = ""             # "" = WORKDIR/jax_cache
  c.checkpoint_fallback = False        # True: every training step resumes past a damaged latest checkpoint
  if a.tiny:  # plumbing for tests and experiments' dry runs: the random tiny model, 2 steps, 4 items per task
    c.base = "tiny"
    c.branch.arg = ",".join(x for x in (c.branch.arg, "tiny") if x)
    c.branch.phases.sft.update(dict(steps=2, checkpoint_every=1, log_every=1))
    c.router.arg = "tiny"
    c.router.overrides.router.update(dict(max_steps=2, checkpoint_every=1, log_every=1))
    c.eval.update(dict(n_per_domain=4, nll_seq_len=128, nll_batch_rows=2))
    c.estimate.update(dict(eval_seconds_per_model=2.0 * a.n, other_seconds=2.0))
  return c
