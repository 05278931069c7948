"""Ablation: experts per token at inference on the BAR model (run the pipeline first). Paper: top-4 of 5 ~ top-5.

  python experiments/sweeps/top_k.py [--variant=quick|tiny]
"""
import os

from experiments.sweeps.common import append, args, evaluate_row

a = args(__doc__)
model = os.path.join(a.pipeline_workdir, "routed")
if not os.path.isdir(model):
  model = os.path.join(a.pipeline_workdir, "merged")
domains = list(a.pcfg.domains) + ["general"]
rows = []
for k in (1, 2, 4, 5):
  for norm in ((False, True) if k < 5 else (False,)):
    rows.append(evaluate_row(a, f"top{k}" + ("_norm" if norm else ""), model, domains,
                             {"top_k": k, "norm_topk": norm}))
append(a, f"top_k at inference ({os.path.basename(model)})", rows,
       "top5 = every expert (the paper's setting); _norm renormalises the chosen router probabilities.")
