"""Ablation: the share of general data mixed into a branch's training (the paper's ratio is unpublished).

  python experiments/sweeps/general_ratio.py [--variant=quick|tiny] [--domain=tool_use]
"""
from experiments.sweeps.common import append, args, branch, evaluate_row

a = args(__doc__)
rows = [evaluate_row(a, f"{a.domain}_general_{r}", branch(a, f"{a.domain}_general_{r}", {"general_ratio": r}),
                     [a.domain, "general"]) for r in (0.0, 0.25, 0.5)]
append(a, f"General-data ratio ({a.domain} branch)", rows, "Same steps and tokens; only the mix changes.")
