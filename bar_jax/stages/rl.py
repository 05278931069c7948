"""Stage rl: reinforcement learning with verifiable rewards (GRPO) on a branch.

  python -m bar_jax.train --config=configs/rl.py:math --config.model=BRANCH_DIR --workdir=DIR

The branch's RL settings (configs/rl.py) run through stages/rollouts.py: rollouts sampled from the current parameters
are the training loop's batches and the clipped GRPO objective its loss (loop.train: the same step, checkpoints,
metrics and exact resume as every other phase). The greedy domain score on eval_n held-out prompts is measured
before and after. WORKDIR follows the workdir contract (bar_jax/io/workdir.py).
"""
from __future__ import annotations

import os

from bar_jax import sharding, stage_configs
from bar_jax.errors import BarError
from bar_jax.io import models
from bar_jax.io import workdir as workdir_lib
from bar_jax.stages import common, rollouts


def run(config, workdir: str) -> str:
  config, identity, state = stage_configs.begin(config, workdir)
  if state == workdir_lib.FINISHED:
    return workdir
  if not config.model:
    raise BarError("rl needs an input branch: pass --config.model=BRANCH_DIR (an artifact written by the branch stage)")
  model = models.load_model(config.model)
  if model.cfg.ffn != "moe":
    raise BarError(f"{config.model} is a {model.manifest.get('kind', 'dense')} model; RL runs on a branch "
                   "(upcycle it with the branch stage first)")
  cfg, compute = common.model_overrides(model.cfg, config.compute)
  mesh = sharding.mesh_from(config)
  rc = config.rl
  metrics = {}
  eval_task = rollouts.capability_task(rc, model.tokenizer, split="eval") if rc.eval_n else None
  ev = dict(n=rc.eval_n, max_new_tokens=rc.eval_max_new_tokens, batch_size=rc.eval_batch_size, compute=compute)
  workdir_lib.start(workdir, identity)
  if eval_task:
    metrics[f"{eval_task.name}_before"] = rollouts.evaluate_task(model.params, cfg, model.tokenizer, eval_task, **ev)
  params, record = rollouts.run_rl(model.params, cfg, model.tokenizer, rc, os.path.join(workdir, "rl"), mesh=mesh,
                                   identity=identity, compute=compute,
                                   checkpoint_fallback=config.checkpoint_fallback)
  if eval_task:
    metrics[f"{eval_task.name}_after"] = rollouts.evaluate_task(params, cfg, model.tokenizer, eval_task, **ev)
  record["metrics"] = metrics
  parent = dict(model.manifest, role="parent")
  return models.write_artifact(workdir, model, params, cfg, "branch", [record], [parent], identity=identity,
                               keep_checkpoints=config.keep_checkpoints, metrics=metrics,
                               base_fingerprint=model.manifest.get("base_fingerprint", model.manifest["fingerprint"]),
                               domain=model.manifest.get("domain", rc.capability))
