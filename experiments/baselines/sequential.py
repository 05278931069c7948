"""Sequential continued training: dense SFT on one domain after another (math -> code -> tool_use -> safety), each
with a branch's recipe, starting from the previous model. Rows after each domain show forgetting of the earlier ones.
get_config returns {order, step: a train_lm config}; the runner chains the bases.
"""
import ml_collections

from experiments.baselines.common import DOMAINS, dense_sft, domain_mix


def get_config(arg="default"):
  variant = arg or "default"
  c = ml_collections.ConfigDict()
  c.order = list(DOMAINS)
  c.steps = ml_collections.ConfigDict({d: dense_sft(variant, domain_mix(variant, [d])) for d in DOMAINS})
  for d in DOMAINS:
    c.steps[d].domain_label = d
  return c
