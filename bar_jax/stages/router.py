"""Stage router (Route): train only the router of a merged MoE on a stratified sample of every domain's SFT data.

  moe artifact --(router rows from the merge; everything else frozen)--> router training --> new moe artifact
                                                                                             + routing.json/.png

The data is a stratified `router.fraction` of each expert domain's SFT conversations plus general data (the paper:
5% of the SFT data, 2 epochs, lr 1e-4, z-loss 0.001, no load-balance loss); steps = ceil(epochs * rows / batch),
capped by router.max_steps when > 0. Only layers/moe/router/kernel trains, every column of it (frozen_experts = []),
and the stage checks before writing that every other leaf is bit-identical to the input's. The new manifest records
the router's data (domains, sample sizes, fingerprint) and cost (the train_phase record), and lineage (parent = the
input moe). Routing diagnostics per domain are written next to the artifact; eval before/after when asked.
The router training itself lives in stages/router_training.py (the upgrade stage runs it too); WORKDIR follows the
workdir contract (bar_jax/io/workdir.py).
"""
from __future__ import annotations

from bar_jax import sharding, stage_configs
from bar_jax.io import workdir as workdir_lib
from bar_jax.stages import common
from bar_jax.stages import router_training as rt


def run(config, workdir: str) -> str:
  config, identity, state = stage_configs.begin(config, workdir)
  if state == workdir_lib.FINISHED:
    return workdir
  model = rt.load_moe(config.model)
  cfg, compute = common.model_overrides(model.cfg, config.compute, config.moe)
  experts = list(model.manifest.get("experts") or [f"expert{e}" for e in range(cfg.n_experts)])
  rc = config.router
  rt.load_capabilities(model.manifest, rt.expert_domains(model.manifest))  # a missing spec: one line, before work
  fractions = {d: float(rc.fraction) for d in rt.data_domains(rc, model.manifest)}
  mesh = sharding.mesh_from(config)
  workdir_lib.start(workdir, identity)
  metrics_before = rt.evaluate(config, cfg, model.params, model.tokenizer, mesh, experts[1:], compute) \
      if config.eval.before else {}
  params, record = rt.train_router(model, cfg, model.params, rc, fractions, workdir, mesh, seed=config.seed,
                                   identity=identity, compute=compute, experts=experts,
                                   checkpoint_fallback=config.checkpoint_fallback)
  rt.check_only_router_changed(model.params, params, cfg)
  parent = dict(model.manifest, role="moe")
  return rt.finish(config, workdir, model, cfg, params, [record], [parent], experts, mesh, identity=identity,
                   metrics_before=metrics_before, compute=compute, router_data=record["data"],
                   merge_rule=model.manifest.get("merge_rule"), capabilities=model.manifest.get("capabilities", {}))
