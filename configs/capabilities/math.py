"""Math: reasoning-gym's arithmetic and GSM-style word problems; exact match of the final answer; RL on the short
arithmetic generators (what a 135M model can learn by RL). Fields: configs/capabilities/template.py."""


def get_config():
  return dict(
      name="math",
      description="Arithmetic and grade-school word problems with verifiable integer answers",
      license="reasoning-gym: Apache-2.0",
      data=dict(source="reasoning_gym"),
      metric=dict(name="exact_match", extractor="answer"),
      rl=dict(groups=["basic_arithmetic", "chain_sum", "products"]),
      general=dict(weight=0.25, capability="general"),
  )
