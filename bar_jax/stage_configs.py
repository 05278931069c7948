"""One typed schema per stage config, its identity, and the migration of identities stored by older code.

The config files (configs/*.py) hold every default and build ml_collections ConfigDicts, which the command line
(`--config.x=y`), the pipeline's overrides and experiments adjust. `load(config)` reads such a config into its
stage's frozen dataclass (below): every field typed (a list is a list: "a,b" from the command line becomes
["a", "b"] here and nowhere else), every range checked beside its field, a key the stage does not have refused;
each problem is one BarError line naming the field and the fix. Stages read the typed config only.

"No eval" has one spelling: an empty list (`eval.domains=[]`, or `--config.eval.domains=` on the command line).
`compute` (a `model.config.Compute`: dtype, remat, attention, dispatch, capacity_factor) is how a run evaluates the
model; `moe` (top_k, norm_topk) is the MoE's routing, part of the function and of the identity.

The stage identity (bar_jax/io/workdir.py says what it decides) is `canonical` of the typed config: run-time fields
left out (RUNTIME_KEYS: Compute's fields and the fields marked runtime below), each input artifact (a schema's
INPUTS) named by its fingerprint, phases the stage does not run left out, and `schema: SCHEMA_VERSION`. Identities
stored before the typed schema (no `schema` key) are read through `migrate_identity`, so finished and started
work keeps being found.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, Mapping, Optional

from bar_jax import schema
from bar_jax.errors import BarError
from bar_jax.io import workdir as workdir_lib
from bar_jax.model.config import Compute
from bar_jax.schema import (Section, at_least, every, in_range, non_negative, one_of, or_minus_one, positive,
                            setting)

SCHEMA_VERSION = 2  # 1: the untyped resolved ConfigDict (no `schema` key); 2: the typed canonical form
PHASES = ("midtrain", "sft", "rl")
_section = dataclasses.dataclass(frozen=True)


def _divergence() -> schema.Check:
  return (lambda v: v == 0 or v > 1), "0 (only a non-finite loss stops the run) or a number > 1"


def _mesh_axis() -> schema.Check:
  return (lambda v: v == -1 or v >= 1), "-1 (the rest of the devices) or an integer >= 1"


# ----------------------------------------------------------------------------------------------------------------
# Shared sections.

@_section
class Mesh(Section):
  """Device mesh axis sizes (bar_jax/sharding.py make_mesh: an axis left out has size 1; one may be -1)."""
  data: int = setting(_mesh_axis(), default=1)
  fsdp: int = setting(_mesh_axis(), default=1)
  expert: int = setting(_mesh_axis(), default=1)
  tensor: int = setting(_mesh_axis(), default=1)


@_section
class Opt(Section):
  lr: float = setting(positive())
  warmup_steps: int = setting(at_least(0))
  end_lr_frac: float = setting(in_range(0.0, 1.0))
  weight_decay: float = setting(non_negative())
  b1: float = setting(in_range(0.0, 1.0, hi_open=True))
  b2: float = setting(in_range(0.0, 1.0, hi_open=True))
  clip_norm: float = setting(non_negative())        # 0: no clipping
  schedule: str = setting(one_of("cosine", "constant"))
  eps: float = setting(positive())
  router_lr_mult: float = setting(non_negative())


@_section
class Routing(Section):
  """The MoE's routing as this stage writes or trains it (ModelConfig fields: stored in the model's manifest)."""
  top_k: int = setting(at_least(0))                 # experts per token; 0 = every expert (the paper)
  norm_topk: bool = setting()                       # renormalise the kept experts' router weights


@_section
class RoutingOverride(Section):
  """The routing a model is evaluated with: None keeps the model's own (its manifest's)."""
  top_k: Optional[int] = setting(at_least(0))       # None: the model's; 0: every expert
  norm_topk: Optional[bool] = setting()             # None: the model's


@_section
class Data(Section):
  kind: str = setting(one_of("lm", "sft"))          # lm: mid-training text; sft: chat, loss on assistant turns
  mix: dict[str, float] = setting(((lambda m: all(w >= 0 for w in m.values())), "weights >= 0"))
  seq_len: int = setting(at_least(2))
  max_examples: int = setting(at_least(0))          # 0: every example


@_section
class Phase(Section):
  """One supervised training phase (mid-training or SFT)."""
  data: Data = setting()
  batch_size: int = setting(at_least(1))
  accum: int = setting(at_least(1))                 # micro-batches per step
  steps: int = setting(at_least(1))
  opt: Opt = setting()
  z_loss: float = setting(non_negative())
  lb_loss: float = setting(non_negative())
  divergence_factor: float = setting(_divergence())
  checkpoint_every: int = setting(at_least(1), runtime=True)
  log_every: int = setting(at_least(1), runtime=True)


@_section
class LmPhase(Phase):
  trainable: list[str] = setting()                  # parameter path regexes


@_section
class RlPhase(Section):
  """GRPO settings (configs/rl.py rl_config): the branch's rl phase; the rl stage's `rl` adds what a branch sets."""
  groups: list[str] = setting()                     # []: the spec's rl.groups
  instruction: str = setting()
  max_prompts: int = setting(at_least(0))           # 0: every prompt that fits
  steps: int = setting(at_least(1))
  prompts_per_step: int = setting(at_least(1))
  group_size: int = setting(at_least(1))
  max_prompt_len: int = setting(at_least(1))
  max_response_len: int = setting(at_least(1))
  temperature: float = setting(non_negative())
  top_p: float = setting(in_range(0.0, 1.0, lo_open=True))
  clip_low: float = setting(non_negative())
  clip_high: float = setting(non_negative())
  kl_coef: float = setting(non_negative())
  adv_eps: float = setting(positive())
  scale_advantages: bool = setting()
  ppo_epochs: int = setting(at_least(1))
  minibatches: int = setting(at_least(1))
  accum: int = setting(at_least(1))
  opt: Opt = setting()
  verifier_timeout_s: float = setting(positive())
  eval_n: int = setting(at_least(0))                # 0: no before/after score
  eval_max_new_tokens: int = setting(at_least(1))
  eval_batch_size: int = setting(at_least(1))
  checkpoint_every: int = setting(at_least(1), runtime=True)
  log_every: int = setting(at_least(1), runtime=True)


@_section
class Rl(RlPhase):
  capability: str = setting()                       # a built-in name or a spec file
  trainable: list[str] = setting()
  frozen_experts: list[int] = setting(every(((lambda e: e >= 0), "expert indices >= 0")))
  seed: int = setting(at_least(0))


def _domains(auto: str | None) -> schema.Check:
  """Capability names / spec paths; `auto` (when given) only alone. [] = none."""
  def ok(v):
    return (auto not in v or v == [auto]) and len(set(v)) == len(v)
  alone = f", {auto!r} alone" if auto else ""
  return ok, f"a list of capability names or spec paths, each once{alone}, or [] for none"


def _no_none(v: Any) -> Any:
  """'none' was a spelling of "no eval"; the one spelling is the empty list."""
  if v == "none" or v == ["none"]:
    raise ValueError("no eval is the empty list: --config.eval.domains= (nothing after '='), or [] or \"\" in a "
                     "config file")
  return v


@_section
class LmEval(Section):
  domains: list[str] = setting(_domains(None), coerce=_no_none)  # []: no eval
  n_per_domain: int = setting(at_least(1))
  max_new_tokens: int = setting(at_least(1))
  batch_size: int = setting(at_least(1))


@_section
class StageEval(LmEval):
  """Eval before and after a stage's training: domains ["auto"] = the model's own capabilities and general."""
  domains: list[str] = setting(_domains("auto"), coerce=_no_none)
  before: bool = setting()


class StageConfig(Section):
  """A stage's config: `stage` names bar_jax/stages/<stage>.py; INPUTS are the keys naming input artifacts."""
  INPUTS: ClassVar[tuple[str, ...]] = ()


def _is_spec(ref: str) -> bool:
  return ref.endswith(".py") or "/" in ref


def _check_capabilities(path: str, refs, *, allow_general: bool) -> None:
  from bar_jax.data import capability
  usable = [d for d in capability.BUILTIN if allow_general or d != "general"]
  for d in refs:
    if d not in usable and not _is_spec(d):  # a spec file: read (and checked) when the stage runs
      raise BarError(f"{path}: unknown domain {d!r}; use some of {','.join(usable)}, or a capability spec file")
  twice = sorted({d for d in refs if list(refs).count(d) > 1})
  if twice:
    raise BarError(f"{path} lists {','.join(twice)} more than once; list each domain once")


def _check_phase_order(path: str, order, known) -> None:
  for name in order:
    if name not in known:
      raise BarError(f"{path}.phase_order: unknown phase {name!r}; use some of {list(known)}, in that order")
  if len(set(order)) != len(order):
    raise BarError(f"{path}.phase_order={list(order)} names a phase twice; list each once")


def _check_top_k(path: str, top_k, n_experts: int) -> None:
  if top_k is not None and top_k > n_experts:
    raise BarError(f"{path}={top_k} is more than the merged model's {n_experts} experts (anchor + one per branch); "
                   f"use 0 (all experts) or 1..{n_experts}")


# ----------------------------------------------------------------------------------------------------------------
# The stages.

@_section
class TrainLm(StageConfig):
  INPUTS: ClassVar[tuple[str, ...]] = ("base",)
  stage: Literal["train_lm"] = setting()
  base: str = setting()                             # an artifact dir, "smollm2" or "tiny" (tests)
  seed: int = setting(at_least(0))
  domain_label: str = setting()                     # the manifest's `domain`
  phase_order: list[str] = setting()
  phases: dict[str, LmPhase] = setting()
  eval: LmEval = setting()
  compute: Compute = setting()
  mesh: Mesh = setting(runtime=True)
  keep_checkpoints: bool = setting(runtime=True)
  distributed: bool = setting(runtime=True)
  checkpoint_fallback: bool = setting(runtime=True)  # a damaged latest checkpoint: resume from the one before

  def validate(self, path):
    _check_phase_order(path, self.phase_order, list(self.phases))

  def canonical_dict(self, d):
    return dict(d, phases={k: v for k, v in d["phases"].items() if k in self.phase_order})


@_section
class Schedule(Section):
  """What trains in each branch phase: parameter path regexes (the anchor's slices never)."""
  midtrain: list[str] = setting()
  sft: list[str] = setting()
  rl: list[str] = setting()


@_section
class BranchPhases(Section):
  midtrain: Phase = setting()
  sft: Phase = setting()
  rl: RlPhase = setting()


@_section
class Branch(StageConfig):
  INPUTS: ClassVar[tuple[str, ...]] = ("base", "expert_init")
  stage: Literal["branch"] = setting()
  base: str = setting()
  capability: str = setting()                       # a built-in name or a spec file
  seed: int = setting(at_least(0))
  expert_kind: str = setting(one_of("ffn", "lora"))
  lora_rank: int = setting(at_least(1))
  lora_alpha: float = setting(positive())
  expert_init: str = setting()                      # "": the base's FFN; or a dense artifact dir
  router_init: str = setting(one_of("random", "zeros", "expert_share"))
  general_ratio: float = setting(or_minus_one(in_range(0.0, 1.0, hi_open=True)))
  frozen_experts: list[int] = setting(every(((lambda e: e >= 0), "expert indices >= 0")))
  schedule: Schedule = setting()
  phase_order: list[str] = setting()
  phases: BranchPhases = setting()
  eval: StageEval = setting()
  compute: Compute = setting()
  mesh: Mesh = setting(runtime=True)
  keep_checkpoints: bool = setting(runtime=True)
  self_contained: bool = setting(runtime=True)       # False: over a base dir, store only the leaves training changed
  distributed: bool = setting(runtime=True)
  checkpoint_fallback: bool = setting(runtime=True)  # a damaged latest checkpoint: resume from the one before
  # router_init=expert_share: the expert's mean weight at the start, and the packed rows of the first phase's data
  # mix it is set on (defaults here only for identities stored before they existed; configs/branch.py sets them)
  router_expert_share: float = setting(in_range(0.5, 1.0, hi_open=True), default=0.9)
  router_calibration_rows: int = setting(at_least(1), default=8)

  def validate(self, path):
    _check_capabilities(f"{path}.capability", [self.capability], allow_general=False)
    _check_phase_order(path, self.phase_order, PHASES)

  def canonical_dict(self, d):
    run = [p for p in PHASES if p in self.phase_order]
    d = dict(d, phases={k: d["phases"][k] for k in run}, schedule={k: d["schedule"][k] for k in run})
    if self.router_init != "expert_share":  # settings of expert_share only: other branches keep their identities
      d.pop("router_expert_share")
      d.pop("router_calibration_rows")
    return d


@_section
class RlStage(StageConfig):
  INPUTS: ClassVar[tuple[str, ...]] = ("model",)
  stage: Literal["rl"] = setting()
  model: str = setting()                            # the input branch artifact dir
  rl: Rl = setting()
  compute: Compute = setting()
  mesh: Mesh = setting(runtime=True)
  keep_checkpoints: bool = setting(runtime=True)
  distributed: bool = setting(runtime=True)
  checkpoint_fallback: bool = setting(runtime=True)  # a damaged latest checkpoint: resume from the one before


@_section
class Merge(StageConfig):
  INPUTS: ClassVar[tuple[str, ...]] = ("branches", "base")
  stage: Literal["merge"] = setting()
  branches: list[str] = setting()                   # branch artifact dirs; expert i + 1 = branch i
  base: str = setting()                             # the dense base (rules average, base, ties)
  rule: str = setting(one_of("average", "average_branches", "base", "weighted", "ties"))
  weights: list[float] = setting(every(((lambda w: w >= 0), "weights >= 0")))  # rule weighted: one per branch
  ties_density: float = setting(in_range(0.0, 1.0, lo_open=True))
  ties_scale: float = setting(non_negative())
  moe: Routing = setting()
  place_on_mesh: bool = setting(runtime=True)
  mesh: Mesh = setting(runtime=True)

  def validate(self, path):
    if self.branches:
      _check_top_k(f"{path}.moe.top_k", self.moe.top_k, len(self.branches) + 1)


def _router_init() -> schema.Check:
  def ok(v):
    from bar_jax.transforms import router_init
    return v in router_init.METHODS
  return ok, "one of bar_jax/transforms/router_init.py METHODS (merged: the merge's columns, the recipe)"


@_section
class RouterSection(Section):
  domains: list[str] = setting(_domains(None))      # []: the MoE's expert domains (+ general when general)
  general: bool = setting()
  fraction: float = setting(in_range(0.0, 1.0, lo_open=True))  # stratified share of each domain's SFT
  max_examples: int = setting(at_least(0))          # per domain after sampling; 0: no cap
  epochs: float = setting(non_negative())           # 0: no training step (a closed-form init only)
  max_steps: int = setting(at_least(0))             # 0: no cap
  batch_size: int = setting(at_least(1))
  accum: int = setting(at_least(1))
  seq_len: int = setting(at_least(2))
  overlong: str = setting(one_of("truncate", "drop"))
  opt: Opt = setting()
  warmup_frac: float = setting(in_range(0.0, 1.0))
  z_loss: float = setting(non_negative())
  lb_loss: float = setting(non_negative())
  divergence_factor: float = setting(_divergence())
  init: str = setting(_router_init())
  init_rows: int = setting(at_least(1))
  init_seq_len: int = setting(at_least(2))
  init_ridge: float = setting(non_negative())
  init_max_logit: float = setting(positive())
  checkpoint_every: int = setting(at_least(1), runtime=True)
  log_every: int = setting(at_least(1), runtime=True)


@_section
class Diagnostics(Section):
  """Routing diagnostics per domain: max_rows packed held-out rows of seq_len tokens (0 rows: none)."""
  seq_len: int = setting(at_least(2))
  max_rows: int = setting(at_least(0))
  batch_size: int = setting(at_least(1))


@_section
class Router(StageConfig):
  INPUTS: ClassVar[tuple[str, ...]] = ("model",)
  stage: Literal["router"] = setting()
  model: str = setting()                            # the moe artifact dir
  seed: int = setting(at_least(0))
  moe: Routing = setting()
  router: RouterSection = setting()
  routing: Diagnostics = setting()
  eval: StageEval = setting()
  compute: Compute = setting()
  mesh: Mesh = setting(runtime=True)
  keep_checkpoints: bool = setting(runtime=True)
  distributed: bool = setting(runtime=True)
  checkpoint_fallback: bool = setting(runtime=True)  # a damaged latest checkpoint: resume from the one before


def _expert(v: Any) -> Any:
  """An index (2 and "2" are one run) or an expert's name."""
  text = str(v).strip()
  return int(text) if text.lstrip("-").isdigit() else text


@_section
class Local(Section):
  fraction: float = setting(in_range(0.0, 1.0, lo_open=True))         # the new domain's share
  replay_fraction: float = setting(in_range(0.0, 1.0))                 # each other domain's replay share


@_section
class Upgrade(Router):
  INPUTS: ClassVar[tuple[str, ...]] = ("model", "branch")
  stage: Literal["upgrade"] = setting()
  branch: str = setting()                           # the branch whose expert goes in ("" for mode remove)
  mode: str = setting(one_of("replace", "add", "remove", "oracle"))
  expert: int | str = setting(coerce=_expert)       # a slot 1..E-1 or a name; -1: the branch's domain
  allow_domain_change: bool = setting()
  router_update: str = setting(one_of("full", "local", "none"))
  local: Local = setting()


@_section
class Evaluate(StageConfig):
  INPUTS: ClassVar[tuple[str, ...]] = ("model", "drift_base")
  stage: Literal["evaluate"] = setting()
  model: list[str] = setting(((lambda v: len(v) > 0), "one or more artifact dirs, or smollm2"))
  domains: list[str] = setting(_domains("all"), coerce=_no_none)  # ["all"]: every built-in and eval-only set
  n_per_domain: int = setting(at_least(1))
  max_new_tokens: int = setting(at_least(1))
  batch_size: int = setting(at_least(1))
  max_prompt_tokens: int = setting(at_least(0))     # 0: the 95th percentile of the domain's prompts
  nll_seq_len: int = setting(at_least(2))
  nll_batch_rows: int = setting(at_least(1))
  moe: RoutingOverride = setting()
  # Drift NLL (bar_jax/evals/drift.py): "" = off; else the base whose greedy replies make the drift set.
  drift_base: str = setting()
  drift_n: int = setting(at_least(1))               # prompts in the drift set
  drift_tokens: int = setting(at_least(1))          # the base's reply budget
  drift_dir: str = setting(runtime=True)            # where drift sets are kept ("": WORKDIR/../drift)
  protocol: int = setting(at_least(0))              # bar_jax/evals/protocol.py VERSION: another protocol is redone
  compute: Compute = setting()
  # where each model's per-domain results are kept ("": WORKDIR/../eval_cache); default only for stored identities
  cache_dir: str = setting(runtime=True, default="")

  def canonical_dict(self, d):
    if not self.drift_base:  # no drift set: its size and budget change nothing
      d = {k: v for k, v in d.items() if k not in ("drift_n", "drift_tokens")}
    return d


@_section
class ExportHf(StageConfig):
  INPUTS: ClassVar[tuple[str, ...]] = ("model",)
  stage: Literal["export_hf"] = setting()
  model: str = setting()
  max_shard_gb: float = setting(positive())
  verify: bool = setting()


@_section
class ImportBase(StageConfig):
  stage: Literal["import_base"] = setting()
  source: str = setting()                           # "": the packaged SmolLM2 GGUF; a .gguf; a Hugging Face dir
  name: str = setting()


@_section
class Base(StageConfig):
  """The pipeline's own first step: the dense base written once as an artifact."""
  INPUTS: ClassVar[tuple[str, ...]] = ("base",)
  stage: Literal["base"] = setting()
  base: str = setting()


def _enabled(v: Any) -> Any:
  if isinstance(v, str):
    return {"false": False, "0": False, "no": False, "": False, "true": True, "1": True,
            "yes": True}.get(v.strip().lower(), v.strip().lower())
  return v


@_section
class PipelineBranch(Section):
  arg: str = setting()                              # configs/branch.py variant flags, e.g. "lora"
  overrides: Any = setting()                        # configs/branch.py keys, checked when the step is built
  phases: Any = setting()                           # per phase name: overrides of that phase


@_section
class PipelineRouter(Section):
  enabled: bool | Literal["auto"] = setting(coerce=_enabled)  # auto: when the router stage is installed
  arg: str = setting()
  overrides: Any = setting()                        # configs/router.py keys


@_section
class Estimate(Section):
  fraction_of_peak: float = setting(in_range(0.0, 1.0, lo_open=True))
  eval_seconds_per_model: float = setting(non_negative())
  reference_gflops: float = setting(positive())
  other_seconds: float = setting(non_negative())


@_section
class Pipeline(StageConfig):
  """The whole recipe (stages/pipeline.py); its steps' configs are built and loaded before any step runs."""
  stage: Literal["pipeline"] = setting()
  title: str = setting()
  command: str = setting()
  base: str = setting()
  domains: list[str] = setting()
  branch: PipelineBranch = setting()
  merge: Any = setting()                            # configs/merge.py keys
  router: PipelineRouter = setting()
  eval_branches: bool = setting()
  eval_merged_before_router: bool = setting()
  eval: Any = setting()                             # configs/evaluate.py keys
  estimate: Estimate = setting()
  compilation_cache: str = setting(runtime=True)    # "": WORKDIR/jax_cache
  checkpoint_fallback: bool = setting(runtime=True)  # given to every step that trains (branches, router)

  def validate(self, path):
    _check_capabilities(f"{path}.domains", self.domains, allow_general=False)
    top_k = ((self.merge or {}).get("moe") or {}).get("top_k")
    if isinstance(top_k, int) and not isinstance(top_k, bool):
      _check_top_k(f"{path}.merge.moe.top_k", top_k, len(self.domains) + 1)


SCHEMAS: dict[str, type] = {
    "train_lm": TrainLm, "branch": Branch, "rl": RlStage, "merge": Merge, "router": Router, "upgrade": Upgrade,
    "evaluate": Evaluate, "export_hf": ExportHf, "import_base": ImportBase, "base": Base, "pipeline": Pipeline}

RUNTIME_KEYS = frozenset(set().union(*(schema.runtime_fields(c) for c in SCHEMAS.values())))


# ----------------------------------------------------------------------------------------------------------------
# Reading a config, its identity.

def load(config) -> StageConfig:
  """The typed config of a ConfigDict, dict or typed config (returned as it is), or one BarError line."""
  if isinstance(config, StageConfig):
    return config
  d = schema.plain(config)
  stage = d.get("stage")
  if not stage:
    raise BarError("the config has no `stage`; set config.stage (e.g. 'train_lm', 'branch', 'merge')")
  if stage not in SCHEMAS:
    raise BarError(f"unknown stage {stage!r}: no schema in bar_jax/stage_configs.py SCHEMAS (known: "
                   f"{', '.join(SCHEMAS)})")
  return schema.parse(SCHEMAS[stage], d)


def identity(config) -> dict[str, Any]:
  """The stage identity: the canonical typed config, inputs by fingerprint, the schema version."""
  c = load(config)
  d = schema.canonical(c)
  for key in type(c).INPUTS:
    d[key] = workdir_lib.input_fingerprint(d[key])
  d["schema"] = SCHEMA_VERSION
  return d


def strip_runtime(d: Any) -> Any:
  """A plain dict (e.g. a phase record's config) without RUNTIME_KEYS at any depth (sections left empty by that are
  dropped too)."""
  if isinstance(d, Mapping):
    out = {}
    for k, v in d.items():
      if k in RUNTIME_KEYS:
        continue
      v = strip_runtime(v)
      if isinstance(v, dict) and not v and isinstance(d[k], Mapping) and d[k]:
        continue
      out[k] = v
    return out
  if isinstance(d, (list, tuple)):
    return [strip_runtime(v) for v in d]
  return d


# ----------------------------------------------------------------------------------------------------------------
# Identities stored by older code.

_V1_ROUTING = ("top_k", "norm_topk")


def _v1_to_v2(stage: str, d: dict[str, Any]) -> dict[str, Any]:
  """An untyped (v1) identity with today's key names: compute's routing keys moved to `moe`, compute dropped
  (all run-time now: capacity_factor was kept by v1), "none" eval domains as the empty list."""
  d = dict(d)
  compute = dict(d.pop("compute", None) or {})
  if stage in ("merge", "router", "upgrade", "evaluate"):
    moe = {k: compute.get(k) for k in _V1_ROUTING}
    if stage != "evaluate":  # v1 configs gave both; absent = ModelConfig's default
      moe = {"top_k": moe["top_k"] or 0, "norm_topk": bool(moe["norm_topk"])}
    d["moe"] = moe
  ev = d.get("eval")
  if isinstance(ev, Mapping) and ev.get("domains") == "none":
    d["eval"] = dict(ev, domains=[])
  if stage == "evaluate":
    if d.get("domains") == "none":
      d["domains"] = []
    # v1 evaluations were of protocol 1 and made no drift set (bar_jax/evals/protocol.py): they read as such and
    # so differ from today's in `protocol` alone, which redoes them.
    d.setdefault("protocol", 1)
    for key, off in (("drift_base", ""), ("drift_n", 1), ("drift_tokens", 1)):
      d.setdefault(key, off)
  return d


def migrate_identity(found: Any) -> Any:
  """A stored identity in today's canonical form. A v1 identity (written before the typed schema) is read as the
  config it was made from: keys renamed (`_v1_to_v2`), typed and checked by its stage's schema (its run-time
  fields absent), and written canonically, so it equals the identity a fresh run of the same settings computes.
  A checkpoint claim ({"stage": identity, "phase": name}, or an identity plus keys of the phase's own) is migrated
  around its stage identity. One that cannot be read that way raises one BarError line saying how to re-create
  it; anything else is returned as it is (and then differs)."""
  if not isinstance(found, Mapping) or "schema" in found:
    return found
  stage = found.get("stage")
  if isinstance(stage, Mapping):
    return {**found, "stage": migrate_identity(stage)}
  cls = SCHEMAS.get(stage)
  if cls is None:
    return found
  names = {f.name for f in dataclasses.fields(cls)}
  extras = {k: v for k, v in found.items() if k not in names and k not in ("compute", "moe")}
  try:
    typed = schema.parse(cls, _v1_to_v2(stage, {k: v for k, v in found.items() if k not in extras}),
                         "config", missing_runtime=True)
  except BarError as e:
    raise BarError(f"its {stage} identity was written by an older bar_jax and does not read as today's config "
                   f"({e}); move the folder aside and run the same command again to re-create it") from None
  out = schema.canonical(typed)
  out["schema"] = SCHEMA_VERSION
  out.update(extras)
  return out


def begin(config, workdir: str, result_file: str = workdir_lib.MANIFEST):
  """Every stage's first lines: (the typed config, its identity, what WORKDIR holds: FINISHED | RESUME | FRESH)."""
  config = load(config)
  ident = identity(config)
  return config, ident, workdir_lib.resolve(workdir, ident, result_file, migrate=migrate_identity)


def recorded(outdir: str, result_file: str = workdir_lib.MANIFEST) -> tuple[str | None, Any]:
  """workdir.recorded with the identity migrated; an identity that cannot be migrated reads as none."""
  state, found = workdir_lib.recorded(outdir, result_file)
  try:
    return state, migrate_identity(found)
  except BarError:
    return state, None
