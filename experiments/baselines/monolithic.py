"""Monolithic retraining: one dense model trained on every domain's SFT data mixed (+ general at the branch ratio),
for as many steps as the branches together (same total tokens). The paper's "retrain, post-training only" (47.8).
"""
from experiments.baselines.common import dense_sft, domain_mix


def get_config(pcfg):
  c = dense_sft(pcfg, domain_mix(pcfg, list(pcfg.domains)), steps_scale=len(pcfg.domains))
  c.domain_label = "all"
  return c
