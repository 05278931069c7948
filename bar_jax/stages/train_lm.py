"""Stage train_lm: continue training a dense model (mid-training on text, or SFT with loss on assistant tokens).

Also the monolithic baselines: one dense model trained on all domains' data mixed.
"""
from __future__ import annotations

from bar_jax.stages import common


def run(config, workdir: str) -> str:
  if common.done(workdir):
    return workdir
  base = common.load_model(config.base)
  cfg, compute = common.model_overrides(base.cfg, config.get("compute", None))
  if cfg.ffn != "dense":
    raise common.BarError(f"train_lm trains dense models; {config.base} is {cfg.ffn}: use the branch or router stage")
  mesh = common.mesh_from(config)
  params, stages = base.params, []
  for name in config.phase_order:
    phase = config.phases[name]
    params, record = common.train_phase(name=name, model=base, cfg=cfg, params=params, phase=phase,
                                        workdir=workdir, mesh=mesh, seed=config.seed,
                                        trainable=phase.get("trainable", [r".*"]), frozen_experts=(), compute=compute)
    stages.append(record)
  metrics = common.evaluate(config, cfg, params, base.tokenizer, mesh, compute)
  parent = dict(base.manifest, role="base")
  return common.write_artifact(workdir, base, params, cfg, "dense", stages, [parent], metrics=metrics,
                               base_fingerprint=base.manifest["fingerprint"],
                               domain=config.get("domain_label", "mixed"))
