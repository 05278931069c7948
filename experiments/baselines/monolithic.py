"""Monolithic retraining: one dense model trained on every domain's SFT data mixed (+ general at the branch ratio),
for as many steps as the four branches together (same total tokens). The paper's "retrain, post-training only" (47.8).
"""
from experiments.baselines.common import DOMAINS, dense_sft, domain_mix


def get_config(arg="default"):
  variant = arg or "default"
  c = dense_sft(variant, domain_mix(variant, DOMAINS), steps_scale=len(DOMAINS))
  c.domain_label = "all"
  return c
