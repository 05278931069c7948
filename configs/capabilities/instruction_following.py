"""Instruction following: IFBench's test prompts with verifiable constraints (word counts, formats, keyword
placement, ...), scored by if-verifiable's maintained IFBench checkers: 1 when the reply meets every constraint of
its prompt (prompt-level strict accuracy). An evaluation set only (no training data): the general-capability
percentage of BAR's tables, where the paper saw its one regression (Chat). Fields: configs/capabilities/template.py.
"""


def get_config():
  return dict(
      name="instruction_following",
      description="Follow verifiable formatting and content constraints (IFBench)",
      license="IFBench test prompts (AllenAI): Apache-2.0; checkers: if-verifiable (Apache-2.0)",
      data=dict(source="ifbench"),
      metric=dict(name="verifier", verifier="bar_jax.evals.instructions:follows_all"),
      general=dict(weight=0.0, capability="general"),
  )
