"""Stage train_lm: continue training a dense model (mid-training on text, or SFT with loss on assistant tokens).

Also the monolithic baselines: one dense model trained on all domains' data mixed. WORKDIR follows the workdir
contract (bar_jax/io/workdir.py): the same config returns the finished artifact or resumes, another is refused.
"""
from __future__ import annotations

from bar_jax import sharding, stage_configs
from bar_jax.errors import BarError
from bar_jax.io import models
from bar_jax.io import workdir as workdir_lib
from bar_jax.stages import common


def run(config, workdir: str) -> str:
  config, identity, state = stage_configs.begin(config, workdir)
  if state == workdir_lib.FINISHED:
    return workdir
  base = models.load_model(config.base)
  cfg, compute = common.model_overrides(base.cfg, config.compute)
  if cfg.ffn != "dense":
    raise BarError(f"train_lm trains dense models; {config.base} is {cfg.ffn}: use the branch or router stage")
  mesh = sharding.mesh_from(config)
  workdir_lib.start(workdir, identity)
  params, stages = base.params, []
  for name in config.phase_order:
    phase = config.phases[name]
    params, record = common.train_phase(name=name, model=base, cfg=cfg, params=params, phase=phase,
                                        workdir=workdir, mesh=mesh, seed=config.seed, identity=identity,
                                        trainable=phase.trainable, frozen_experts=(), compute=compute,
                                        checkpoint_fallback=config.checkpoint_fallback)
    stages.append(record)
  metrics = common.evaluate(config, cfg, params, base.tokenizer, mesh, compute)
  parent = dict(base.manifest, role="base")
  return models.write_artifact(workdir, base, params, cfg, "dense", stages, [parent], identity=identity,
                               keep_checkpoints=config.keep_checkpoints, metrics=metrics,
                               base_fingerprint=base.manifest["fingerprint"], domain=config.domain_label)
