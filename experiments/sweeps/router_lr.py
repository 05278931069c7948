"""Router learning-rate sweep (1e-4 .. 1e-2) at the recipe's router budget (2 epochs of the 5% stratified sample) on
the BAR pipeline's merged model (run the pipeline first). The paper trains its router at 1e-4 (script default 8e-5,
3% warmup, decay to 0); Ai2's scripts also hold a {2e-4, 2e-3, 2e-2} sweep at top-4 without results.

  python experiments/sweeps/router_lr.py [--variant=quick|tiny] [--max_steps=0]

Each lr trains WORKDIR/router_lr_<lr> from PIPELINE_WORKDIR/merged (resumable; skipped when complete), evaluates it
with the pipeline's eval settings and appends the table to experiments/results/ablations_smollm2[_<variant>].md.
Choosing the default: the lr with the best overall score; where its interval overlaps others', prefer the paper's
1e-4 among the overlapping ones. The choice is made on the evaluation items, so say so beside any table row that uses
it (a clean choice needs a second, held-out item split). Cost on 2 CPU cores: one full-budget router run per lr,
~3.1 h each (experiments/results/paper_table_plan.md).
"""
import os
import sys

from common import append, args, evaluate_row, stage
from bar_jax.stages import pipeline

LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
max_steps = 0
for arg in list(sys.argv[1:]):
  if arg.startswith("--max_steps="):
    max_steps = int(arg.split("=", 1)[1])
    sys.argv.remove(arg)

a = args(__doc__)
domains = list(a.pcfg.domains)
merged = os.path.join(a.pipeline_workdir, "merged")
rows = []
for lr in LRS:
  rc = pipeline.router_config(a.pcfg, merged)
  rc.router.max_steps = max_steps  # 0 = the recipe's 2 epochs (the pipeline's default caps it)
  rc.router.opt.lr = lr
  name = f"router_lr_{lr:g}"
  rows.append(evaluate_row(a, name, stage(a, name, "router", rc.to_dict()), domains + ["general"]))
append(a, f"Router learning rate (max_steps={max_steps or 'the recipe: 2 epochs of the 5% sample'})", rows,
       "Every row starts from the same merged model; only the router trains.")
