"""Base + N branches -> one MoE with E = N + 1 experts (anchor first, then each branch's domain expert in order).

  experts        slot 0 = the anchor (the branches' expert 0; averaged if they drifted apart, else copied exactly),
                 slot i = branch i's expert 1. LoRA branches give a LoRA MoE: the anchor plus N stacked adapters.
  router         column 0 = mean of the branches' anchor columns, column i = branch i's domain column.
  shared leaves  (embeddings, attention, norms, LM head) reconciled by `rule`:
                   average            uniform mean over the base and the N branches, i.e. N + 1 trees (the recipe's
                                      merge script averages every model on its command line: the anchor model and
                                      the N branches, dividing by N + 1);
                   average_branches   uniform mean over the N branches only (BTX-style; no base needed);
                   base               the base model's own leaf;
                   weighted  sum_i w_i * branch_i with `weights` normalised to sum to 1;
                   ties      TIES over the deltas d_i = branch_i - base: keep each d_i's top `ties_density` share
                             of entries by magnitude (per leaf), elect each entry's sign from the summed trimmed
                             deltas, average the trimmed deltas that agree with it, add `ties_scale` x that to base.

Memory: branches are Mappings path -> array ("layers/attn/q/kernel"), e.g. the artifact reader's lazy mapping
that loads a leaf when indexed; nested dicts are accepted too. Each output leaf is built from one input leaf at a
time, accumulating in a float64 buffer of one leaf, so peak memory is the output plus about three leaves (the TIES
rule reads each branch's leaf twice to stay within that). Means are taken in float64 and rounded once, so averaging
identical leaves returns them bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from bar_jax.errors import BarError
from bar_jax.pytree import as_flat, unflatten
from bar_jax.model.config import ModelConfig

RULES = ("average", "average_branches", "base", "weighted", "ties")
NEEDS_BASE = ("average", "base", "ties")
# The FFN slot's expert count and routing: what a merge or an upgrade sets, so never compared between models.
ROUTING_FIELDS = ("ffn", "n_experts", "top_k", "norm_topk")
MOE = "layers/moe/"


def architecture(cfg: ModelConfig) -> dict[str, Any]:
  """What must match between models whose experts are stacked: the architecture minus the FFN slot's routing
  (d_ff and the expert settings stay: experts of different widths or kinds cannot be stacked)."""
  return {k: v for k, v in cfg.to_dict().items() if k not in ROUTING_FIELDS}


def check_stackable(branch_cfg: ModelConfig, into_cfg: ModelConfig, *, what: str, into: str, fix: str) -> None:
  """The one compatibility check of merge and upgrade: BarError unless the 2-expert branch `branch_cfg` (named `what`)
  can have its domain expert stacked with the experts of `into_cfg` (named `into`: another branch or an MoE).
  fix: what the user should do when the architectures differ."""
  if branch_cfg.ffn != "moe" or branch_cfg.n_experts != 2:
    raise BarError(f"{what} is not a 2-expert branch (ffn={branch_cfg.ffn}, n_experts={branch_cfg.n_experts}): "
                   "pass an artifact written by the branch stage")
  a, b = architecture(into_cfg), architecture(branch_cfg)
  expert_fields = ("expert_kind", "lora_rank", "lora_alpha") if into_cfg.expert_kind == "lora" else ("expert_kind",)
  for f in expert_fields:
    if a[f] != b[f]:
      raise BarError(f"{what} has {f}={b[f]} but {into} has {a[f]}: the experts cannot be stacked; re-train it with "
                     f"{into}'s expert settings")
  diff = ", ".join(f"{k}={b[k]} vs {a[k]}" for k in sorted(a) if a[k] != b[k] and k not in ("lora_rank", "lora_alpha"))
  if diff:
    raise BarError(f"{what} has a different architecture from {into} ({diff}): {fix}")


def merge(base_params: Mapping[str, Any] | None, branch_params: Sequence[Mapping[str, Any]],
          branch_cfgs: Sequence[ModelConfig], *, rule: str = "average", weights: Sequence[float] | None = None,
          ties_density: float = 0.2, ties_scale: float = 1.0, top_k: int = 0,
          norm_topk: bool = False) -> tuple[dict[str, Any], ModelConfig]:
  """Returns (moe_params as a nested dict of numpy arrays, moe_cfg). base_params (the dense base the branches were
  made from) is read by the `average`, `base` and `ties` rules (None is fine for the others). top_k / norm_topk set
  the merged model's routing; the config is the branches' architecture, nothing of how they were trained or run."""
  n = len(branch_params)
  cfg = _check(base_params, branch_params, branch_cfgs, rule, weights, ties_density)
  branches = [as_flat(b) for b in branch_params]
  base = as_flat(base_params) if base_params is not None else None
  w = None
  if rule == "weighted":
    w = np.asarray(weights, np.float64) / float(np.sum(weights))
  out: dict[str, Any] = {}
  paths = list(branches[0])
  for i, b in enumerate(branches[1:], 1):
    if set(b) != set(paths):
      missing = sorted(set(paths) ^ set(b))[:3]
      raise BarError(f"branch {i} and branch 0 hold different parameters (e.g. {missing}): merge only branches of "
                     "the same base and expert kind")
  if base is not None and rule in NEEDS_BASE:
    missing = sorted(p for p in paths if not p.startswith(MOE) and p not in base)[:3]
    if missing:
      raise BarError(f"the base model lacks the branches' shared parameters {missing}: pass the branches' base")
  for path in paths:
    leaves = lambda: (b[path] for b in branches)  # noqa: E731  (re-iterable: loads one leaf at a time)
    if path == MOE + "router/kernel":
      out[path] = _router(leaves())
    elif path.startswith(MOE + "experts/"):
      out[path] = _experts(leaves(), n, cfg.expert_kind)
    elif path.startswith(MOE + "lora/"):
      out[path] = np.concatenate([np.asarray(x) for x in leaves()], axis=1)  # [L, N, ...]: adapter i = branch i
    elif rule == "average":
      out[path] = _mean(_chain(base[path], leaves()))
    elif rule == "average_branches":
      out[path] = _mean(leaves())
    elif rule == "weighted":
      out[path] = _weighted(leaves(), w)
    elif rule == "base":
      out[path] = np.array(base[path])
    else:
      out[path] = _ties(np.asarray(base[path]), leaves, ties_density, ties_scale)
  moe_cfg = cfg.replace(n_experts=n + 1, top_k=top_k, norm_topk=norm_topk).validate()
  return unflatten(out), moe_cfg


# ----------------------------------------------------------------------------------------------------------------
# Checks (before reading any array).

def _check(base, branches, cfgs, rule, weights, ties_density) -> ModelConfig:
  n = len(branches)
  if n == 0 or n != len(cfgs):
    raise BarError(f"merge needs one config per branch and at least one branch (got {n} branches, "
                   f"{len(cfgs)} configs)")
  if rule not in RULES:
    raise BarError(f"unknown merge rule {rule!r}: use one of {RULES}")
  if rule in NEEDS_BASE and base is None:
    hint = " or use rule 'average_branches' (the N branches only)" if rule == "average" else ""
    raise BarError(f"merge rule {rule!r} needs the base model's params: pass base_params (config.base){hint}")
  if rule == "weighted" and (weights is None or len(weights) != n or min(weights) < 0 or sum(weights) <= 0):
    raise BarError(f"merge rule 'weighted' needs {n} non-negative weights with a positive sum, got {weights}")
  if rule == "ties" and not 0 < ties_density <= 1:
    raise BarError(f"ties_density={ties_density} must be in (0, 1]")
  for i, c in enumerate(cfgs):
    check_stackable(c, cfgs[0], what=f"branch {i}", into="branch 0", fix="merge only branches of the same base")
  return cfgs[0]


# ----------------------------------------------------------------------------------------------------------------
# Per-leaf rules. Each takes an iterator that loads one branch leaf at a time.

def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
  yield first
  yield from rest


def _mean(leaves: Iterator[Any]) -> np.ndarray:
  acc, count, dtype = None, 0, None
  for x in leaves:
    x = np.asarray(x)
    dtype = x.dtype
    acc = x.astype(np.float64) if acc is None else np.add(acc, x, out=acc)
    count += 1
    del x  # drop this branch's leaf before the next one is read
  return np.divide(acc, count, out=acc).astype(dtype)


def _weighted(leaves: Iterator[Any], w: np.ndarray) -> np.ndarray:
  acc, dtype, i = None, None, -1
  for x in leaves:
    i += 1
    wi = w[i]
    x = np.asarray(x)
    dtype = x.dtype
    term = x.astype(np.float64) * wi
    acc = term if acc is None else np.add(acc, term, out=acc)
    del x, term
  return acc.astype(dtype)


def _router(leaves: Iterator[Any]) -> np.ndarray:
  """[L, D, 2] per branch -> [L, D, N + 1]: column 0 the mean anchor column, column i branch i's column 1."""
  anchor, domain, count, dtype = None, [], 0, None
  for x in leaves:
    x = np.asarray(x)
    dtype = x.dtype
    anchor = x[..., 0].astype(np.float64) if anchor is None else np.add(anchor, x[..., 0], out=anchor)
    domain.append(np.array(x[..., 1]))
    count += 1
    del x
  return np.stack([(anchor / count).astype(dtype)] + domain, axis=-1)


def _experts(leaves: Iterator[Any], n: int, kind: str) -> np.ndarray:
  """[L, 2, ...] per ffn branch -> [L, N + 1, ...]; [L, 1, ...] (the anchor only) per lora branch -> [L, 1, ...]."""
  out, anchor, dtype, i = None, None, None, -1
  for x in leaves:  # (not enumerate: its cached result tuple would keep the previous leaf alive during a read)
    i += 1
    x = np.asarray(x)
    if out is None:
      dtype = x.dtype
      out = np.empty((x.shape[0], n + 1 if kind == "ffn" else 1) + x.shape[2:], dtype)
    anchor = x[:, 0].astype(np.float64) if anchor is None else np.add(anchor, x[:, 0], out=anchor)
    if kind == "ffn":
      out[:, i + 1] = x[:, 1]
    del x
  out[:, 0] = np.divide(anchor, n, out=anchor)
  return out


def _trim(delta: np.ndarray, density: float) -> np.ndarray:
  """Zero all but the ceil(density * size) largest-magnitude entries (ties at the threshold are kept)."""
  keep = int(np.ceil(density * delta.size))
  if keep >= delta.size:
    return delta
  mag = np.abs(delta).ravel()
  threshold = np.partition(mag, delta.size - keep)[delta.size - keep]
  return np.where(np.abs(delta) >= threshold, delta, 0.0)


def _ties(base: np.ndarray, leaves: Callable[[], Iterator[Any]], density: float, scale: float) -> np.ndarray:
  b64 = base.astype(np.float64)
  elected = np.zeros_like(b64)
  for x in leaves():                                   # pass 1: the elected sign of the summed trimmed deltas
    elected += _trim(np.asarray(x, np.float64) - b64, density)
  elected = np.sign(elected)
  total, count = np.zeros_like(b64), np.zeros_like(b64)
  for x in leaves():                                   # pass 2: disjoint mean of the deltas that agree with it
    d = _trim(np.asarray(x, np.float64) - b64, density)
    agree = (np.sign(d) == elected) & (d != 0)
    total += np.where(agree, d, 0.0)
    count += agree
  merged = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
  return (b64 + scale * merged).astype(base.dtype)
