"""Stage branch (Branch + Adapt): upcycle the dense base into a 2-expert branch and adapt it on one domain.

  dense base --upcycle--> [anchor (frozen) | domain expert] + router --midtrain--> --sft--> (--rl-->) branch artifact

Each phase trains the regexes of config.schedule[phase] (the paper's progressive unfreezing by default) with the
anchor's slices (config.frozen_experts) frozen; its data is the domain mixed with general data at
config.general_ratio (-1: the spec's general.weight). config.capability is a built-in name or a spec file
(configs/capabilities/template.py). Nothing is shared with other branches but the base artifact, so branches can be
trained on different machines. The branch's manifest records the base fingerprint, the capability (its name as
`domain`, and its record: spec path, fingerprint of the data files, mapping and metric), every phase (steps, tokens,
FLOPs, data fingerprint) and the capability's eval metrics before and after.
Written over a base artifact directory, the branch stores only the leaves its training changed; the anchor slices and
the frozen leaves are read back from the base (io/artifact.py `over_base`).
"""
from __future__ import annotations

import os

import jax
import ml_collections

from bar_jax import sharding, stage_configs
from bar_jax.errors import BarError
from bar_jax.io import models
from bar_jax.io import workdir as workdir_lib
from bar_jax.stages import common, rollouts
from bar_jax.transforms import freeze, upcycle

PHASES = ("midtrain", "sft", "rl")


def phase_configs(config) -> dict[str, ml_collections.ConfigDict]:
  """The phases to run, in order, each with its data mix filled in from the capability and its general-data share
  (config.general_ratio, or the spec's general.weight when it is -1)."""
  from bar_jax.data import capability
  cap = capability.get(config.capability)
  weight, general_ref = cap.general
  r = weight if float(config.general_ratio) < 0 else float(config.general_ratio)
  out = {}
  for name in config.phase_order:
    if name not in PHASES:
      raise BarError(f"unknown branch phase {name!r} in phase_order; use some of {list(PHASES)} in that order")
    phase = ml_collections.ConfigDict(config.phases[name].to_dict())
    if name == "rl":  # the RL settings of configs/rl.py, run on this branch's domain and unfreezing schedule
      phase.update(capability=cap.name, trainable=list(config.schedule.rl),
                   frozen_experts=list(config.frozen_experts), seed=config.seed)
    elif not phase.data.mix:
      if not 0.0 <= r < 1.0:
        raise BarError(f"general_ratio={r} must be in [0, 1): the share of general data mixed into the capability's")
      general = capability.get(general_ref).name
      phase.data.mix = {cap.name: 1.0 - r, general: r} if r and general != cap.name else {cap.name: 1.0}
    out[name] = phase
  return out


def _expert_share_router(config, tokenizer, params, cfg, phases, compute):
  """The router of router_init=expert_share, set on config.router_calibration_rows packed rows of each domain in the
  first phase's data mix (the train split's stratified sample, system prompt masked); returns (params, record)."""
  import time
  import numpy as np
  from bar_jax.data import pipeline
  from bar_jax.evals import routing
  from bar_jax.transforms import router_init
  start, first = time.time(), next(iter(phases.values()))
  if "data" not in first or not first.data.mix:
    raise BarError("router_init=expert_share: the first branch phase has no data mix to set the router on; use "
                   "router_init=random")
  batches = []
  for domain in first.data.mix:
    convs = pipeline.stratified_sample([domain], 1.0, seed=config.seed)[domain]
    rows = routing.conversation_rows(tokenizer, convs, seq_len=int(first.data.seq_len),
                                     max_rows=int(config.router_calibration_rows))
    batches.append(rows)
  params, layers = router_init.expert_share(models.to_host(params), cfg, batches, float(config.router_expert_share),
                                            compute=compute)
  return params, {"stage": "router_init", "method": "expert_share", "share": float(config.router_expert_share),
                  "tokens": int(sum(np.sum(b["mask"]) for b in batches)), "steps": 0,
                  "seconds": round(time.time() - start, 1), "layers": layers}


def run(config, workdir: str) -> str:
  config, identity, state = stage_configs.begin(config, workdir)
  if state == workdir_lib.FINISHED:
    return workdir
  from bar_jax.data import capability
  cap = capability.get(config.capability)  # unknown name, bad spec or bad data -> one line, before any work
  phases = phase_configs(config)

  base = models.load_model(config.base)
  init = models.load_model(config.expert_init).params if config.expert_init else None
  # Router init: "random" (OLMo-core's default, the recipe's), "zeros" (a fresh branch is the base exactly), or
  # "expert_share" (random, then the expert's column offset so it starts with that share of the weight).
  params, cfg = upcycle.upcycle(base.params, base.cfg, expert_kind=config.expert_kind, lora_rank=config.lora_rank,
                                lora_alpha=config.lora_alpha, expert_init=init, key=jax.random.key(config.seed),
                                router_init="random" if config.router_init == "expert_share" else config.router_init)
  cfg, compute = common.model_overrides(cfg, config.compute)
  router_record = None
  if config.router_init == "expert_share":
    params, router_record = _expert_share_router(config, base.tokenizer, params, cfg, phases, compute)
  # Check every phase's trainable set now, before any data is built or anything is written.
  for name, phase in phases.items():
    freeze.make_partition(params, cfg, list(config.schedule[name]), list(config.frozen_experts))
  mesh = sharding.mesh_from(config)
  workdir_lib.start(workdir, identity)

  eval_domains = list(config.eval.domains)
  if eval_domains == ["auto"]:
    eval_domains = list(dict.fromkeys([cap.name, capability.get(cap.general[1]).name]))
  metrics_before = common.evaluate(config, cfg, params, base.tokenizer, mesh, compute, eval_domains) \
      if config.eval.before else {}
  stages = [router_record] if router_record else []
  for name, phase in phases.items():
    if name == "rl":
      params, record = rollouts.run_rl(params, cfg, base.tokenizer, phase, os.path.join(workdir, "phases", name),
                                       mesh=mesh, identity={"stage": identity, "phase": name}, compute=compute,
                                       checkpoint_fallback=config.checkpoint_fallback)
    else:
      params, record = common.train_phase(name=name, model=base, cfg=cfg, params=params, phase=phase,
                                          workdir=workdir, mesh=mesh, seed=config.seed, identity=identity,
                                          trainable=list(config.schedule[name]),
                                          frozen_experts=list(config.frozen_experts), compute=compute,
                                          checkpoint_fallback=config.checkpoint_fallback)
    stages.append(record)
  metrics = common.evaluate(config, cfg, params, base.tokenizer, mesh, compute, eval_domains)
  parent = dict(base.manifest, role="base")
  # Over a base artifact directory, the branch stores only what its training changed (the anchor and every leaf its
  # schedule kept frozen are the base's); self_contained stores everything.
  over_base = config.base if os.path.isdir(config.base) and not config.self_contained else None
  return models.write_artifact(
      workdir, base, params, cfg, "branch", stages, [parent], identity=identity,
      keep_checkpoints=config.keep_checkpoints, over_base=over_base, from_base=upcycle.ANCHOR_FROM_BASE,
      domain=cap.name, capability=cap.record(), base_fingerprint=base.manifest["fingerprint"],
      base_name=base.name, expert_kind=config.expert_kind, metrics=metrics, metrics_before=metrics_before,
      general_ratio=config.general_ratio, expert_init=config.expert_init or "base")
