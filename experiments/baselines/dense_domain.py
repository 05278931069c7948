"""Dense per-domain fine-tunes: the base trained (all weights) on one domain + general data, with a branch's recipe.

Not a row of the table by itself: the dense weight-merging and BTX baselines are built from these models (one per
pipeline domain), and the sequential baseline's first step is the first of them.
"""
from experiments.baselines.common import dense_sft, domain_mix


def get_config(pcfg, domain: str):
  c = dense_sft(pcfg, domain_mix(pcfg, [domain]))
  c.domain_label = domain
  return c
