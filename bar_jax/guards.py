"""Guards against silent failure: settings checked before any work starts, and training numbers checked as they come.

Pure functions of plain values (no I/O, no jax), so every rule is testable in microseconds:
  check_settings(config)   ranges and types of every known knob, wherever it sits in the config tree
  check_lists(config)      a stage's list-valued settings: domains known and unique, top_k within the experts
  LossGuard.check(row)     a non-finite loss or gradient norm, or a loss far above its running level, stops training
Each failure is a BarError: one line naming the setting (or step), the bad value and what to change.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

from bar_jax.errors import BarError

# ----------------------------------------------------------------------------------------------------------------
# Settings: key name -> (predicate on the value, what a valid value is). A key means the same thing wherever it
# appears (a phase, a pipeline override, the router's block), so one table covers every stage's config.

_INT, _NUM = "an integer", "a number"


def _int_at_least(lo: int) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_int(v) and v >= lo), f"{_INT} >= {lo}"


def _num_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> tuple[Callable[[Any], bool], str]:
  def ok(v):
    return (_is_num(v) and math.isfinite(v) and (v > lo if lo_open else v >= lo)
            and (v < hi if hi_open else v <= hi))
  lo_s, hi_s = ("(" if lo_open else "["), (")" if hi_open else "]")
  return ok, f"{_NUM} in {lo_s}{lo:g}, {hi:g}{hi_s}"


_INF = float("inf")


def _spec_or(check: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
  """-1 (take the value from the capability spec) or what `check` allows."""
  ok, text = check
  return (lambda v: v == -1 or ok(v)), f"-1 (the capability spec's value) or {text}"
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # sizes and counts
    "steps": _int_at_least(1), "max_steps": _int_at_least(0), "warmup_steps": _int_at_least(0),
    "batch_size": _int_at_least(1), "accum": _int_at_least(1), "seq_len": _int_at_least(2),
    # max_prompt_tokens 0: the prompt budget comes from the data (configs/evaluate.py)
    "nll_seq_len": _int_at_least(2), "max_new_tokens": _int_at_least(1), "max_prompt_tokens": _int_at_least(0),
    "n_per_domain": _int_at_least(1), "max_examples": _int_at_least(0), "max_rows": _int_at_least(0),
    "checkpoint_every": _int_at_least(1), "log_every": _int_at_least(1), "prompts_per_step": _int_at_least(1),
    "group_size": _int_at_least(1), "ppo_epochs": _int_at_least(1), "lora_rank": _int_at_least(1),
    "top_k": _int_at_least(0), "seed": _int_at_least(0),
    # optimiser
    "lr": _num_in(0.0, _INF, lo_open=True, hi_open=True), "weight_decay": _num_in(0.0, _INF, hi_open=True),
    "clip_norm": _num_in(0.0, _INF, hi_open=True), "b1": _num_in(0.0, 1.0, hi_open=True),
    "b2": _num_in(0.0, 1.0, hi_open=True), "end_lr_frac": _num_in(0.0, 1.0),
    "z_loss": _num_in(0.0, _INF, hi_open=True), "lb_loss": _num_in(0.0, _INF, hi_open=True),
    "kl_coef": _num_in(0.0, _INF, hi_open=True), "warmup_frac": _num_in(0.0, 1.0),
    "divergence_factor": _num_in(1.0, _INF, lo_open=True, hi_open=True),
    # sampling
    "temperature": _num_in(0.0, _INF, hi_open=True), "top_p": _num_in(0.0, 1.0, lo_open=True),
    # data mixing
    "general_ratio": _spec_or(_num_in(0.0, 1.0, hi_open=True)), "fraction": _num_in(0.0, 1.0, lo_open=True),
    "epochs": _num_in(0.0, _INF, lo_open=True, hi_open=True), "lora_alpha": _num_in(0.0, _INF, lo_open=True,
                                                                                    hi_open=True),
    # the pipeline's progress estimate
    "fraction_of_peak": _num_in(0.0, 1.0, lo_open=True), "reference_gflops": _num_in(0.0, _INF, lo_open=True),
    "eval_seconds_per_model": _num_in(0.0, _INF, hi_open=True), "other_seconds": _num_in(0.0, _INF, hi_open=True),
}


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _items(tree) -> Iterable[tuple[str, Any]]:
  """(dotted path, value) of every leaf of a nested mapping (ConfigDict, dict)."""
  for k, v in tree.items():
    if isinstance(v, Mapping) or hasattr(v, "items") and not isinstance(v, (str, bytes)):
      for sub, x in _items(v):
        yield f"{k}.{sub}", x
    else:
      yield str(k), v


def check_settings(config) -> None:
  """BarError for the first known knob (by its key name, anywhere in the tree) outside its range or of a wrong type."""
  for path, value in _items(config):
    rule = RULES.get(path.rsplit(".", 1)[-1])
    if rule is None or value is None:
      continue
    ok, valid = rule
    if not ok(value):
      raise BarError(f"config.{path}={value!r} is invalid: it must be {valid}; set --config.{path} to such a value")


def check_lists(config, known_domains: Iterable[str]) -> None:
  """The stage-specific list checks that a key-by-key walk cannot make (before any step runs)."""
  known = list(known_domains)
  stage = config.get("stage", "")
  if stage == "pipeline":
    domains = _as_list(config.get("domains", []))
    _check_domains("config.domains", domains, known, allow_general=False)
    top_k = (config.get("merge", {}) or {}).get("compute", {}) or {}
    _check_top_k("config.merge.compute.top_k", top_k.get("top_k", 0) if hasattr(top_k, "get") else 0,
                 len(domains) + 1)
  elif stage == "merge":
    branches = _as_list(config.get("branches", ""))
    _check_top_k("config.compute.top_k", (config.get("compute", {}) or {}).get("top_k", 0), len(branches) + 1)
  elif stage == "branch":
    _check_domains("config.capability", [config.get("capability", "")], known, allow_general=False)


def _check_domains(name: str, domains: list[str], known: list[str], allow_general: bool) -> None:
  usable = [d for d in known if allow_general or d != "general"]
  for d in domains:
    if d not in usable and not (d.endswith(".py") or "/" in d):  # a capability spec file: read (and checked) later
      raise BarError(f"{name}: unknown domain {d!r}; use some of {','.join(usable)}")
  twice = sorted({d for d in domains if domains.count(d) > 1})
  if twice:
    raise BarError(f"{name} lists {','.join(twice)} more than once; list each domain once")


def _check_top_k(name: str, top_k, n_experts: int) -> None:
  if _is_int(top_k) and top_k > n_experts:
    raise BarError(f"{name}={top_k} is more than the merged model's {n_experts} experts (anchor + one per branch); "
                   f"use 0 (all experts) or 1..{n_experts}")


def _as_list(value) -> list[str]:
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return [str(v) for v in (value or [])]


# ----------------------------------------------------------------------------------------------------------------
# Training numbers.

class LossGuard:
  """Stops training on a non-finite loss or gradient norm, or a loss above `factor` x its running level.

  The running level is an exponential moving average of the finite losses seen so far (weight `decay` on the old
  level); it starts after `warmup` rows, since the first losses of a run move fast. A loss 10x its level is far
  outside a healthy run's noise (an LM's loss starts near ln(vocab) and falls), and within a few steps of a real
  divergence (an lr 1e4x too large reaches 1e9).
  """

  def __init__(self, factor: float = 10.0, warmup: int = 3, decay: float = 0.9):
    self.factor, self.warmup, self.decay = float(factor), int(warmup), float(decay)
    self.level: float | None = None
    self.seen = 0

  def check(self, row: Mapping[str, Any], where: str = "training") -> None:
    step = row.get("step", "?")
    for key in ("loss", "grad_norm"):
      v = row.get(key)
      if v is not None and not math.isfinite(float(v)):
        raise BarError(f"{where}: {key} is {float(v)} at step {step}; nothing from this step was saved (the last "
                       f"good checkpoint is kept): lower the learning rate (opt.lr) or check the data and the "
                       f"checkpoint it resumed from, then re-run in a fresh --workdir")
    loss = row.get("loss")
    if loss is None:
      return
    loss = float(loss)
    if self.factor and self.level is not None and self.seen >= self.warmup and loss > self.factor * self.level:
      raise BarError(f"{where}: loss {loss:.4g} at step {step} is over {self.factor:g}x its running level "
                     f"{self.level:.4g} (diverging); the last good checkpoint is kept: lower the learning rate "
                     f"(opt.lr) and re-run in a fresh --workdir, or raise divergence_factor if this is expected")
    self.level = loss if self.level is None else self.decay * self.level + (1 - self.decay) * loss
    self.seen += 1


def json_safe(row: Mapping[str, Any]) -> dict[str, Any]:
  """A metrics row that json.dumps writes as valid JSON: non-finite floats become null (bare NaN is not JSON)."""
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
