"""Upgrade an MoE without touching the rest: replace expert i with a newer branch's expert, add a branch's expert as
expert E, remove expert i, or keep a subset of the experts. Pure: nested dicts of arrays in, nested dicts of numpy
arrays out.

  replace(moe, cfg, branch, i)   experts[:, i] (or LoRA adapter i - 1) <- the branch's domain expert (its slot 1);
                                 router column i <- the branch's column 1. Every other leaf and slice is copied.
  add(moe, cfg, branch)          experts gain slot E (LoRA: adapter E - 1), the router gains column E, both from the
                                 branch's slot / column 1; n_experts becomes E + 1.
  remove(moe, cfg, i)            expert i and its router column dropped (a capability withdrawn: FlexOlmo's data
                                 opt-out); the softmax renormalises over the rest; n_experts becomes E - 1.
  slice_experts(moe, cfg, keep)  only experts `keep` (anchor first) with their router columns, optionally with
                                 another tree's router kernel and/or shared leaves: [0, d] with branch d's router is
                                 the oracle model (merged shared weights, no routing between domains).

Shared leaves (attention, embeddings, norms, LM head) always stay the MoE's: the new expert runs on the merged shared
weights (a choice of this library: it keeps every other expert's behaviour; the branch's own shared weights are not
merged in). `expert_fingerprints` hashes each expert's slice of every expert-stacked leaf, so
a test or a reader can prove which experts changed from the manifests alone.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from bar_jax.errors import BarError
from bar_jax.fingerprints import leaf_fingerprint
from bar_jax.pytree import as_flat, unflatten
from bar_jax.model.config import ModelConfig
from bar_jax.transforms import merge as merge_lib

ROUTER = "layers/moe/router/kernel"
EXPERTS = "layers/moe/experts/"
LORA = "layers/moe/lora/"
MOE = "layers/moe/"


def check_compatible(moe_cfg: ModelConfig, branch_cfg: ModelConfig, *, what: str = "the branch") -> None:
  """BarError unless the branch's expert can sit in the MoE: same architecture and expert settings."""
  if moe_cfg.ffn != "moe" or moe_cfg.n_experts < 2:
    raise BarError(f"the model to upgrade is not an MoE (ffn={moe_cfg.ffn}, n_experts={moe_cfg.n_experts}): "
                   "pass an artifact written by the merge, router or upgrade stage")
  merge_lib.check_stackable(branch_cfg, moe_cfg, what=what, into="the MoE",
                            fix="upgrade only with branches of the MoE's base")


def _copy_flat(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {p: np.array(x) for p, x in as_flat(tree).items()}


def replace(moe: Mapping[str, Any], cfg: ModelConfig, branch: Mapping[str, Any], branch_cfg: ModelConfig,
            index: int) -> dict[str, Any]:
  """The MoE with expert `index` (1..E-1; 0 is the anchor) and its router column taken from the branch."""
  check_compatible(cfg, branch_cfg)
  if not 1 <= index < cfg.n_experts:
    raise BarError(f"expert index {index} is out of range: this MoE has experts 1..{cfg.n_experts - 1} "
                   "(0 is the frozen anchor); pass one of those")
  out, b = _copy_flat(moe), as_flat(branch)
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
  m, b = as_flat(moe), as_flat(branch)
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


def check_removable(cfg: ModelConfig, index: int) -> None:
  """BarError unless expert `index` can be removed from an MoE of this config (before any array is read)."""
  if cfg.ffn != "moe" or cfg.n_experts < 2:
    raise BarError(f"the model is not an MoE (ffn={cfg.ffn}, n_experts={cfg.n_experts}): pass an artifact written by "
                   "the merge, router or upgrade stage")
  if not 1 <= index < cfg.n_experts:
    raise BarError(f"expert index {index} cannot be removed: this MoE has experts 1..{cfg.n_experts - 1} (0 is the "
                   "frozen anchor, which every expert builds on); pass one of those")
  if cfg.n_experts < 3:
    raise BarError(f"removing expert {index} would leave only the anchor: an MoE needs at least one domain expert; "
                   "use the dense base model instead")


def remove(moe: Mapping[str, Any], cfg: ModelConfig, index: int) -> tuple[dict[str, Any], ModelConfig]:
  """(the MoE without expert `index` (1..E-1) and its router column, the config with n_experts = E - 1).

  Experts after `index` move down one slot (old slot e > index is new slot e - 1; LoRA adapter e - 1 likewise);
  every other expert slice, router column and shared leaf is copied bit for bit. Routing: the softmax now runs over
  the E - 1 remaining logits, i.e. the old weights of the others renormalised (p_j / (1 - p_index) at top_k = all).
  top_k: a k below the new E stays k (top-2 of 4 becomes top-2 of 3); a k at or above it becomes 0 = every expert
  (top-4 of 5 becomes all 4: k >= E already meant all); norm_topk is kept. An MoE left with only the anchor, or
  index 0 (the anchor), is refused.
  """
  check_removable(cfg, index)
  return slice_experts(moe, cfg, [e for e in range(cfg.n_experts) if e != index])


def slice_experts(moe: Mapping[str, Any], cfg: ModelConfig, keep: Sequence[int], *,
                  router: Mapping[str, Any] | None = None,
                  shared: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], ModelConfig]:
  """(the MoE restricted to experts `keep`, in that order, and its config with n_experts = len(keep)).

  keep: distinct expert indices, the anchor first (keep[0] = 0: a LoRA expert is an adapter over it), at least one
  more; new slot j is old expert keep[j] (ffn: experts[:, keep[j]]; LoRA: adapter keep[j] - 1), with router column
  keep[j]. router: a param tree whose router kernel [L, D, len(keep)] is used whole instead (e.g. branch d's two
  columns for keep = [0, d]). shared: a param tree whose non-MoE leaves (embeddings, attention, norms, LM head) are
  used instead of the MoE's (same paths and shapes). Everything taken is copied bit for bit. top_k / norm_topk as
  in `remove`.
  """
  keep = [int(e) for e in keep]
  n = len(keep)
  if cfg.ffn != "moe":
    raise BarError(f"slice_experts needs an MoE, got ffn={cfg.ffn}: pass a merge, router or upgrade artifact")
  if n < 2 or keep[0] != 0 or len(set(keep)) != n or not all(0 <= e < cfg.n_experts for e in keep):
    raise BarError(f"keep={keep} must list distinct experts of 0..{cfg.n_experts - 1}, the anchor 0 first and at "
                   "least one domain expert after it")
  m = as_flat(moe)
  out: dict[str, np.ndarray] = {}
  for path, x in m.items():
    if path == ROUTER:
      out[path] = np.asarray(x)[..., keep]  # fancy indexing: a copy, bit for bit
    elif path.startswith(EXPERTS) and cfg.expert_kind == "ffn":
      out[path] = np.asarray(x)[:, keep]
    elif path.startswith(LORA):
      out[path] = np.asarray(x)[:, [e - 1 for e in keep[1:]]]
    else:
      out[path] = np.array(x)
  if router is not None:
    r = as_flat(router).get(ROUTER)
    want = out[ROUTER].shape
    if r is None or np.shape(r) != want:
      raise BarError(f"the router tree's {ROUTER} has shape {None if r is None else np.shape(r)}, not {want} "
                     f"({len(keep)} columns for keep={keep}): pass a model with one router column per kept expert")
    out[ROUTER] = np.array(r, dtype=out[ROUTER].dtype)
  if shared is not None:
    s = as_flat(shared)
    mine = sorted(p for p in out if not p.startswith(MOE))
    theirs = sorted(p for p in s if not p.startswith(MOE))
    bad = [p for p in mine if p in s and np.shape(s[p]) != out[p].shape]
    if mine != theirs or bad:
      what = bad[:3] or sorted(set(mine) ^ set(theirs))[:3]
      raise BarError(f"the shared tree does not match the MoE's shared leaves (e.g. {what}): pass a model of the "
                     "MoE's base and architecture")
    for p in mine:
      out[p] = np.array(s[p], dtype=out[p].dtype)
  k = cfg.top_k if cfg.top_k < n else 0
  return unflatten(out), cfg.replace(n_experts=n, top_k=k).validate()


def expert_fingerprints(params: Mapping[str, Any], cfg: ModelConfig,
                        slots: Sequence[int] | None = None) -> dict[str, str]:
  """{"<leaf>[e]": fingerprint of expert e's slice} for every expert-stacked leaf (router columns included).

  Expert e is slot e of experts/* (ffn), adapter e - 1 of lora/* and column e of the router; for LoRA MoEs the
  anchor's stored FFN is expert 0. slots: the index each stored slot had in the model it was sliced from (slot s
  is named and hashed as expert slots[s]), so a sliced model's map compares key by key with the original's.
  """
  name = (lambda s: s) if slots is None else (lambda s: int(slots[s]))  # noqa: E731
  out = {}
  for path, x in as_flat(params).items():
    x = np.asarray(x)
    if path == ROUTER:
      slices = {name(e): x[..., e] for e in range(x.shape[-1])}
    elif path.startswith(EXPERTS):
      slices = {name(e): x[:, e] for e in range(x.shape[1])}
    elif path.startswith(LORA):
      slices = {name(e + 1): x[:, e] for e in range(x.shape[1])}
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
