"""Sequential continued training: dense SFT on one domain after another (the pipeline's domains in order, e.g.
math -> code -> tool_use -> safety), each with a branch's recipe, starting from the previous model. Rows after each
domain show forgetting of the earlier ones. get_config returns {order, steps: {domain: a train_lm config}}; the
runner chains the bases.
"""
import ml_collections

from experiments.baselines.common import dense_sft, domain_mix


def get_config(pcfg):
  c = ml_collections.ConfigDict()
  c.order = list(pcfg.domains)
  c.steps = ml_collections.ConfigDict({d: dense_sft(pcfg, domain_mix(pcfg, [d])) for d in c.order})
  for d in c.order:
    c.steps[d].domain_label = d
  return c
