"""Dense per-domain fine-tunes: the base trained (all weights) on one domain + general data, with a branch's recipe.

Not a row of the table by itself: the dense weight-merging and BTX baselines are built from these four models, and
the sequential baseline's first step is the first of them. arg = "<variant>,<domain>".
"""
from experiments.baselines.common import dense_sft, domain_mix


def get_config(arg="default,math"):
  variant, domain = (arg or "default,math").split(",")
  c = dense_sft(variant, domain_mix(variant, [domain]))
  c.domain_label = domain
  return c
