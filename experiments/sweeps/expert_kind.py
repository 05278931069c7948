"""Ablation: full-FFN experts vs LoRA adapter experts (rank 16, alpha 32; lr 1e-3 as configs/branch.py's lora).

  python experiments/sweeps/expert_kind.py [--variant=quick|tiny] [--domain=tool_use]
"""
from experiments.sweeps.common import append, args, branch, evaluate_row

a = args(__doc__)
kinds = {"ffn": {"expert_kind": "ffn"}, "lora": {"expert_kind": "lora", "phases": {"sft": {"opt": {"lr": 1e-3}}}}}
rows = [evaluate_row(a, f"{a.domain}_{k}", branch(a, f"{a.domain}_{k}", o), [a.domain, "general"])
        for k, o in kinds.items()]
append(a, f"Expert kind ({a.domain} branch)", rows, "Same steps and tokens; trainable parameters differ.")
