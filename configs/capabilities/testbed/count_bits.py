"""Testbed capability count_bits: the number of 1 bits of a number below 65536.

The bare answer is the SFT target and the reference, scored by greedy_match. Its reasoning-gym generator and
options, and how the testbed's tasks were chosen: bar_jax/data/sources/rgym_tasks.py; their measured lengths:
experiments/results/testbed_tasks.md. Fields: configs/capabilities/template.py.
"""


def get_config():
  return dict(
      name="count_bits",
      description="The number of 1 bits of a number below 65536",
      license="reasoning-gym: Apache-2.0",
      data=dict(source="reasoning_gym:count_bits"),
      metric=dict(name="greedy_match"),  # teacher-forced: exact match of the answer's tokens, no decoding
      reward="",                          # RL: greedy_match's own reward, the reply equals the answer
      general=dict(weight=0.25, capability="general"),
  )
