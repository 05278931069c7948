"""Upgrade an MoE without touching the rest: replace expert i with a newer branch's expert, or add a branch's expert as
expert E. Pure: nested dicts of arrays in, nested dicts of numpy arrays out.

  replace(moe, cfg, branch, i)   experts[:, i] (or LoRA adapter i - 1) <- the branch's domain expert (its slot 1);
                                 router column i <- the branch's column 1. Every other leaf and slice is copied.
  add(moe, cfg, branch)          experts gain slot E (LoRA: adapter E - 1), the router gains column E, both from the
                                 branch's slot / column 1; n_experts becomes E + 1.

Shared leaves (attention, embeddings, norms, LM head) always stay the MoE's: the new expert runs on the merged shared
weights (a choice of this library: it keeps every other expert's behaviour; the branch's own shared weights are not
merged in). `expert_fingerprints` hashes each expert's slice of every expert-stacked leaf, so
a test or a reader can prove which experts changed from the manifests alone.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bar_jax.errors import BarError
from bar_jax.fingerprints import leaf_fingerprint
from bar_jax.pytree import unflatten
from bar_jax.model.config import ModelConfig
from bar_jax.transforms import merge as merge_lib

ROUTER = "layers/moe/router/kernel"
EXPERTS = "layers/moe/experts/"
LORA = "layers/moe/lora/"


def check_compatible(moe_cfg: ModelConfig, branch_cfg: ModelConfig, *, what: str = "the branch") -> None:
  """BarError unless the branch's expert can sit in the MoE: same architecture and expert settings."""
  if moe_cfg.ffn != "moe" or moe_cfg.n_experts < 2:
    raise BarError(f"the model to upgrade is not an MoE (ffn={moe_cfg.ffn}, n_experts={moe_cfg.n_experts}): "
                   "pass an artifact written by the merge, router or upgrade stage")
  merge_lib.check_stackable(branch_cfg, moe_cfg, what=what, into="the MoE",
                            fix="upgrade only with branches of the MoE's base")


def _copy_flat(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {p: np.array(x) for p, x in merge_lib.flat(tree).items()}


def replace(moe: Mapping[str, Any], cfg: ModelConfig, branch: Mapping[str, Any], branch_cfg: ModelConfig,
            index: int) -> dict[str, Any]:
  """The MoE with expert `index` (1..E-1; 0 is the anchor) and its router column taken from the branch."""
  check_compatible(cfg, branch_cfg)
  if not 1 <= index < cfg.n_experts:
    raise BarError(f"expert index {index} is out of range: this MoE has experts 1..{cfg.n_experts - 1} "
                   "(0 is the frozen anchor); pass one of those")
  out, b = _copy_flat(moe), merge_lib.flat(branch)
  out[ROUTER][..., index] = np.asarray(b[ROUTER])[..., 1]
  for path in out:
    if path.startswith(EXPERTS) and cfg.expert_kind == "ffn":
      out[path][:, index] = np.asarray(b[path])[:, 1]
    elif path.startswith(LORA):
      out[path][:, index - 1] = np.asarray(b[path])[:, 0]  # adapter i - 1 is expert i
  return unflatten(out)


def add(moe: Mapping[str, Any], cfg: ModelConfig, branch: Mapping[str, Any],
        branch_cfg: ModelConfig) -> tuple[dict[str, Any], ModelConfig]:
  """(the MoE with the branch's domain expert appended as expert E, the config with n_experts = E + 1)."""
  check_compatible(cfg, branch_cfg)
  m, b = merge_lib.flat(moe), merge_lib.flat(branch)
  out: dict[str, np.ndarray] = {}
  for path, x in m.items():
    x = np.asarray(x)
    if path == ROUTER:
      out[path] = np.concatenate([x, np.asarray(b[path])[..., 1:2]], axis=-1)
    elif path.startswith(EXPERTS) and cfg.expert_kind == "ffn":
      out[path] = np.concatenate([x, np.asarray(b[path])[:, 1:2]], axis=1)
    elif path.startswith(LORA):
      out[path] = np.concatenate([x, np.asarray(b[path])[:, 0:1]], axis=1)
    else:
      out[path] = np.array(x)
  # top_k=0 (all experts) stays all; an explicit k stays k.
  return unflatten(out), cfg.replace(n_experts=cfg.n_experts + 1).validate()


def expert_fingerprints(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, str]:
  """{"<leaf>[e]": fingerprint of expert e's slice} for every expert-stacked leaf (router columns included).

  Expert e is slot e of experts/* (ffn), adapter e - 1 of lora/* and column e of the router; for LoRA MoEs the
  anchor's stored FFN is expert 0.
  """
  out = {}
  for path, x in merge_lib.flat(params).items():
    x = np.asarray(x)
    if path == ROUTER:
      slices = {e: x[..., e] for e in range(x.shape[-1])}
    elif path.startswith(EXPERTS):
      slices = {e: x[:, e] for e in range(x.shape[1])}
    elif path.startswith(LORA):
      slices = {e + 1: x[:, e] for e in range(x.shape[1])}
    else:
      continue
    for e, s in slices.items():
      out[f"{path}[{e}]"] = leaf_fingerprint(f"{path}[{e}]", s)
  return dict(sorted(out.items()))


def changed_experts(before: Mapping[str, str], after: Mapping[str, str], include_router: bool = False) -> list[int]:
  """Experts whose slice fingerprints differ (or exist on one side only) between two expert_fingerprints maps; the
  router's columns count only with include_router (router training changes them all)."""
  keys = {k for k in set(before) | set(after) if include_router or not k.startswith(ROUTER)}
  return sorted({int(k.rsplit("[", 1)[1][:-1]) for k in keys if before.get(k) != after.get(k)})
