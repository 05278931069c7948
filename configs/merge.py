"""Merge N branch artifacts into one MoE (anchor + one expert per branch), shared weights averaged over the base
and the N branches (N + 1 trees, as the recipe's merge script does).

  python -m bar_jax.train --config=configs/merge.py --config.branches=runs/math,runs/tool_use --config.base=runs/base \
      --workdir=runs/moe
  # other rules: --config.rule=average_branches|base|weighted|ties (average, base and ties need --config.base=<the
  # branches' base artifact>; weighted needs --config.weights=1,2)

Expected: runs/moe is an `moe` artifact whose manifest lists experts [anchor, math, tool_use], the branches (role
'branch') as parents, their common base_fingerprint and the summed ledger. It takes seconds for SmolLM2-135M; peak
memory stays near the merged model's size (branches are streamed leaf by leaf). Branches from different bases or
architectures, a branch listed twice, or a branch whose files fail their fingerprints stop it with one line naming
the branch, before anything is written.
"""
import ml_collections

from configs.common import mesh_config, parse_arg


def get_config(arg=None):
  parse_arg(arg)  # no variants
  c = ml_collections.ConfigDict()
  c.stage = "merge"
  c.branches = ""               # branch artifact dirs (a list, or comma-separated); expert i + 1 = branch i
  c.base = ""                   # the dense base artifact (needed by the 'average', 'base' and 'ties' rules)
  c.rule = "average"            # average (base + N) | average_branches (N only) | base | weighted | ties
  c.weights = ""                # 'weighted': one non-negative weight per branch, a list or comma-separated (normalised)
  c.ties_density = 0.2          # 'ties': share of each branch's delta kept (by magnitude, per leaf)
  c.ties_scale = 1.0            # 'ties': scale of the merged delta added to the base
  # The merged model's routing (written into its manifest): top_k 0 = every expert (the paper); norm_topk:
  # renormalise the kept experts' weights.
  c.moe = ml_collections.ConfigDict(dict(top_k=0, norm_topk=False))
  c.place_on_mesh = False       # True: shard the merged params on config.mesh (experts over the expert axis)
  c.mesh = mesh_config(data=1, expert=-1)
  return c
