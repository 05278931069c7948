"""Testbed capability word_sequence_reversal: reverse a list of 3-5 words, comma-separated.

The bare answer is the SFT target and the reference, scored by greedy_match. Its reasoning-gym generator and
options, and how the testbed's tasks were chosen: bar_jax/data/sources/rgym_tasks.py; their measured lengths:
experiments/results/testbed_tasks.md. Fields: configs/capabilities/template.py.
"""


def get_config():
  return dict(
      name="word_sequence_reversal",
      description="Reverse a list of 3-5 words, comma-separated",
      license="reasoning-gym: Apache-2.0",
      data=dict(source="reasoning_gym:word_sequence_reversal"),
      metric=dict(name="greedy_match"),  # teacher-forced: exact match of the answer's tokens, no decoding
      reward="",                          # RL: greedy_match's own reward, the reply equals the answer
      general=dict(weight=0.25, capability="general"),
  )
