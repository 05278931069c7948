"""Which parameters a stage trains: path regexes plus frozen expert slots, as data.

A leaf is trainable when its '/'-joined path fully matches one of the stage's regexes. Inside a trainable leaf that
has an expert axis (experts, LoRA adapters, router columns), the slices of `frozen_experts` (default: the anchor,
expert 0) stay frozen: the leaf is split along that axis, so the frozen slice never reaches the optimiser either.
`split` and `join` are pure and exact: join(split(p)) == p bit for bit, and gradients flow only to the trainable part.

The BAR paper's progressive schedule (arXiv 2604.18473) is `SCHEDULE`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from bar_jax.errors import BarError
from bar_jax.pytree import flatten, unflatten
from bar_jax.model import transformer
from bar_jax.model.config import ModelConfig

EXPERTS = r"layers/moe/(experts|lora)/.*"
ROUTER = r"layers/moe/router/kernel"
# OLMo-core's LMHead owns the final norm (lm_head.norm), so the recipe's SFT set `lm_head.*` trains it too.
EMBED_HEAD = r"embed/embedding|lm_head/kernel|final_norm/scale"

# Stage -> trainable regexes (the anchor's slices are frozen by frozen_experts=(0,) throughout).
SCHEDULE: dict[str, tuple[str, ...]] = {
    "midtrain": (EXPERTS, ROUTER),
    "sft": (EXPERTS, ROUTER, EMBED_HEAD),
    "rl": (r".*",),
    "router": (ROUTER,),
    "dense": (r".*",),  # a dense model trains everything (monolithic baselines)
}


@dataclasses.dataclass(frozen=True)
class Partition:
  """Per leaf: None (frozen), "all" (trainable), or (axis, trainable positions, frozen positions)."""
  rules: tuple[tuple[str, Any], ...]

  def as_dict(self) -> dict[str, Any]:
    return dict(self.rules)


def _expert_positions(path: str, axis_names: tuple, cfg: ModelConfig) -> tuple[int, list[int]] | None:
  """(axis, expert index of each position along it) for leaves with an expert axis, else None."""
  for name in ("exp", "exp_router"):
    if name in axis_names:
      axis = axis_names.index(name)
      if "/lora/" in path:
        return axis, list(range(1, cfg.n_experts))   # adapters are experts 1..E-1
      if "/experts/" in path and cfg.expert_kind == "lora":
        return axis, [0]                             # only the anchor is stored
      return axis, list(range(cfg.n_experts))
  return None


def make_partition(params: Any, cfg: ModelConfig, trainable: Sequence[str], frozen_experts: Sequence[int] = (0,)
                   ) -> Partition:
  flat = flatten(params)
  axes = flatten(transformer.logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  compiled = []
  for pattern in trainable:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise BarError(f"trainable regex {pattern!r} does not compile ({e}); fix the stage's trainable list") from None
  for rx in compiled:
    if not any(rx.fullmatch(p) for p in flat):
      raise BarError(f"trainable regex {rx.pattern!r} matches no parameter (a typo?); parameters are: "
                     f"{', '.join(sorted(flat))}")
  frozen_set = set(int(e) for e in frozen_experts)
  rules = []
  for path in sorted(flat):
    if not any(rx.fullmatch(path) for rx in compiled):
      rules.append((path, None))
      continue
    where = _expert_positions(path, axes[path], cfg) if cfg.ffn == "moe" else None
    if where is None or not frozen_set.intersection(where[1]):
      rules.append((path, "all"))
      continue
    axis, experts = where
    train_pos = tuple(i for i, e in enumerate(experts) if e not in frozen_set)
    frozen_pos = tuple(i for i, e in enumerate(experts) if e in frozen_set)
    rules.append((path, (axis, train_pos, frozen_pos) if train_pos else None))
  return Partition(tuple(rules))


def split(params: Any, part: Partition) -> tuple[dict, dict]:
  """params -> (trainable, frozen) flat dicts keyed by path; partially frozen leaves appear in both, sliced."""
  flat = flatten(params)
  trainable, frozen = {}, {}
  for path, rule in part.rules:
    x = flat[path]
    if rule is None:
      frozen[path] = x
    elif rule == "all":
      trainable[path] = x
    else:
      axis, tpos, fpos = rule
      trainable[path] = jnp.take(x, np.asarray(tpos), axis=axis)
      frozen[path] = jnp.take(x, np.asarray(fpos), axis=axis)
  return trainable, frozen


def join(trainable: dict, frozen: dict, part: Partition) -> dict:
  """Inverse of split: the nested parameter dict (frozen slices copied exactly, gradients flow to trainable)."""
  flat = {}
  for path, rule in part.rules:
    if rule is None:
      flat[path] = frozen[path]
    elif rule == "all":
      flat[path] = trainable[path]
    else:
      axis, tpos, fpos = rule
      both = jnp.concatenate([frozen[path], trainable[path]], axis=axis)
      order = np.argsort(np.asarray(fpos + tpos))  # position -> index into the concatenation
      # Frozen slices first (the anchor) is the common case: no gather, so XLA sees a plain concatenation and can
      # drop the frozen slice's gradient (moe.unstack_experts).
      flat[path] = both if np.array_equal(order, np.arange(len(order))) else jnp.take(both, order, axis=axis)
  return unflatten(flat)


def count(tree: dict) -> int:
  return int(sum(np.prod(np.shape(v)) for v in tree.values()))
