"""Ablation: how the merge reconciles the branches' shared weights (average = base + N as the recipe's script,
average_branches = the N branches only, base, ties), on the BAR
pipeline's own branches (run the pipeline first), before router training.

  python experiments/sweeps/merge_rule.py [--variant=quick|tiny]
"""
import os

from experiments.sweeps.common import append, args, evaluate_row, stage

a = args(__doc__)
domains = list(a.pcfg.domains)
branches = ",".join(os.path.join(a.pipeline_workdir, f"branch_{d}") for d in domains)
base = os.path.join(a.pipeline_workdir, "base")
rows = [evaluate_row(a, f"merge_{rule}", stage(a, f"merge_{rule}", "merge",
                                               {"branches": branches, "base": base, "rule": rule}),
                     domains + ["general"]) for rule in ("average", "average_branches", "base", "ties")]
append(a, "Shared-parameter merge rule (4 branches, no router training)", rows)
