"""Upgrade an MoE: replace one expert with a newer branch of its domain, or add a new branch's expert; then only the
router trains (BAR stage 5). Also: remove an expert, or write one domain's oracle model for evaluation.

  # a better tool-use expert: swap it in, retrain the router on the stratified sample (the paper)
  python -m bar_jax.train --config=configs/upgrade.py --config.model=runs/moe_routed \
      --config.branch=runs/branch_tool_use_v2 --workdir=runs/moe_upgraded
  # a new capability: expert E + 1 with its router column from the branch
  python -m bar_jax.train --config=configs/upgrade.py --config.mode=add --config.model=runs/moe_routed \
      --config.branch=runs/branch_safety --workdir=runs/moe_plus_safety
  # local router update (beyond the paper): only the new expert's router column trains, new domain + replay
  ... --config.router_update=local
  # withdraw a capability (FlexOlmo's opt-out): expert and router column dropped, the softmax renormalises over the
  # rest (router_update=full retrains the remaining columns instead)
  python -m bar_jax.train --config=configs/upgrade.py --config.mode=remove --config.expert=tool_use \
      --config.router_update=none --config.model=runs/moe_routed --workdir=runs/moe_minus_tool_use
  # the oracle of one domain for evaluation: [anchor, its expert] on the merged shared weights, the branch's router
  python -m bar_jax.train --config=configs/upgrade.py --config.mode=oracle --config.expert=math \
      --config.branch=runs/branch_math --config.router_update=none --config.model=runs/moe --workdir=runs/oracle_math
  python -m bar_jax.train --config=configs/upgrade.py:tiny ...   # tests: seconds

Expected: an `moe` artifact whose leaf_fingerprints equal the input's for attention, embeddings and norms, whose
expert_fingerprints equal the input's for every expert but the replaced/added one, with parents [moe, branch], an
`upgrade` record (mode, expert index, domain, replaced), and the router's training record; the upgraded domain's
metric rises while the others stay within their noise. A branch of another base, of another domain (without
--config.allow_domain_change=True), an index out of range, or an architecture mismatch: one error line, nothing
written.
remove: an `moe` artifact with E - 1 experts whose remaining experts' slices (and, with router_update=none, router
columns) and shared leaves equal the input's, parents [moe], `upgrade.slots` the old index of each new slot.
oracle: a 2-expert `moe` artifact (experts [anchor, d]) for the evaluate stage, parents [moe, branch]; branch ->
oracle is the cost of averaging the shared weights, oracle -> routed MoE the cost of routing.
"""
import ml_collections

from configs import router as router_config


def get_config(arg=None):
  c = router_config.get_config(arg)
  c.stage = "upgrade"
  c.branch = ""                 # the branch artifact whose domain expert goes in
  c.mode = "replace"            # replace | add | remove | oracle
  # replace, oracle: the slot (1..E-1) or an expert's name; -1 = the expert named like the branch's domain.
  # remove: the slot or name to drop. Typed object so the command line takes an index or a name.
  c.expert = ml_collections.FieldReference(-1, field_type=object)
  c.allow_domain_change = False
  c.router_update = "full"      # full (paper) | local (only the new expert's column) | none (oracle: none only)
  c.local = ml_collections.ConfigDict(dict(fraction=0.05, replay_fraction=0.01))
  return c
