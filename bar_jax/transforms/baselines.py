"""The paper's baselines that are built, not trained: pure functions of dense fine-tunes' parameters.

  average_dense   dense weight merging: the uniform mean of N same-shaped dense models, every leaf (FFN included).
  btx_moe         BTX-style: the base FFN as the anchor, fine-tune i's FFN as expert i, the shared leaves
                  (embeddings, attention, norms, LM head) averaged over the N fine-tunes, the router zero (uniform).

experiments/run_baselines.py trains the dense fine-tunes through the train_lm stage and writes these results as
artifacts under the workdir contract. Means are taken in float64 and rounded once (as transforms/merge.py does), so
averaging identical leaves returns them bit for bit.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bar_jax.errors import BarError
from bar_jax.model.config import ModelConfig
from bar_jax.pytree import flatten, unflatten
from bar_jax.transforms import merge as merge_lib, upcycle


def average_dense(trees: Sequence[Any]) -> dict[str, Any]:
  """The leafwise uniform mean of same-shaped parameter dicts (numpy arrays, each leaf's dtype kept)."""
  if not trees:
    raise BarError("average_dense needs at least one model; pass the dense fine-tunes to average")
  flats = [flatten(t) for t in trees]
  for i, f in enumerate(flats[1:], 1):
    if set(f) != set(flats[0]):
      raise BarError(f"model {i} and model 0 hold different parameters (e.g. {sorted(set(f) ^ set(flats[0]))[:3]}): "
                     "average only fine-tunes of one base")
  out = {}
  for path, first in flats[0].items():
    leaves = [np.asarray(f[path]) for f in flats]
    if any(x.shape != leaves[0].shape for x in leaves):
      raise BarError(f"{path} has shapes {[x.shape for x in leaves]}: average only fine-tunes of one base")
    acc = np.zeros(leaves[0].shape, np.float64)
    for x in leaves:
      acc += x
    out[path] = (acc / len(leaves)).astype(np.asarray(first).dtype)
  return unflatten(out)


def btx_moe(base_params: Any, dense_params: Sequence[Any], cfg: ModelConfig, *,
            rule: str = "average_branches") -> tuple[dict[str, Any], ModelConfig]:
  """(moe params, moe config) with E = N + 1: expert 0 = the base's FFN, expert i = fine-tune i's FFN.

  Each fine-tune becomes a 2-expert branch [base FFN | its own FFN] that keeps its own shared leaves, then the merge
  transform stacks them: `rule` "average_branches" (BTX) averages the shared leaves over the fine-tunes only, the
  anchor is the base FFN exactly, and the zero routers give every expert the same weight until a router trains."""
  if not dense_params:
    raise BarError("btx_moe needs at least one dense fine-tune; pass the per-domain models")
  branches, cfgs = [], []
  for p in dense_params:
    with_base_ffn = dict(p, layers=dict(p["layers"], mlp=base_params["layers"]["mlp"]))
    b, bcfg = upcycle.upcycle(with_base_ffn, cfg, expert_init=p, router_init="zeros")
    branches.append(b)
    cfgs.append(bcfg)
  return merge_lib.merge(base_params if rule in merge_lib.NEEDS_BASE else None, branches, cfgs, rule=rule)
