"""Ablation: the unfreezing schedule. Frozen shared weights (only the expert + router train, FlexOlmo-style) vs the
paper's progressive schedule (SFT also trains embeddings and LM head). Paper: tool use 20.3 frozen vs 46.4.

  python experiments/sweeps/unfreezing.py [--variant=quick|tiny] [--domain=tool_use]
"""
from experiments.sweeps.common import append, args, branch, evaluate_row

from bar_jax.transforms import freeze

a = args(__doc__)
schedules = {"frozen_shared": [freeze.EXPERTS, freeze.ROUTER],
             "progressive": list(freeze.SCHEDULE["sft"])}
rows = [evaluate_row(a, f"{a.domain}_{name}", branch(a, f"{a.domain}_{name}", {"schedule": {"sft": s}}),
                     [a.domain, "general"]) for name, s in schedules.items()]
append(a, f"Unfreezing schedule ({a.domain} branch)", rows,
       "frozen_shared: SFT trains expert + router; progressive: + embeddings and LM head (freeze.SCHEDULE).")
