"""Shared by the baseline configs: the pipeline's branch recipe (steps, batch, seq_len, lr, general ratio) turned
into a dense train_lm phase, so every baseline sees the same data kinds, lengths and learning rate as BAR's branches.

Every config here is a function of the pipeline config (configs/bar_smollm2.py:<variant> with the runner's
--domains), so a baseline follows the BAR run it is compared with; experiments/run_baselines.py fills in `base`."""

import ml_collections

from bar_jax import config_files
from bar_jax.stages import pipeline


def dense_sft(pcfg, mix: dict, steps_scale: int = 1) -> ml_collections.ConfigDict:
  """A train_lm config (base filled in by the runner) with one SFT phase like a branch's, on `mix`."""
  branch = pipeline.branch_config(pcfg, "math", "")
  sft = branch.phases.sft
  c = config_files.stage_config("train_lm")
  c.phase_order = ["sft"]
  c.phases = ml_collections.ConfigDict({"sft": dict(
      data=dict(kind="sft", mix=mix, seq_len=sft.data.seq_len, max_examples=sft.data.max_examples),
      batch_size=sft.batch_size, accum=sft.accum, steps=sft.steps * steps_scale, opt=sft.opt.to_dict(),
      trainable=[r".*"],
      checkpoint_every=sft.checkpoint_every, log_every=sft.log_every, z_loss=0.0, lb_loss=0.0,
      divergence_factor=sft.divergence_factor)})
  c.compute = ml_collections.ConfigDict(branch.compute.to_dict())
  c.eval.domains = []  # the runner evaluates every model with the pipeline's eval settings
  return c


def domain_mix(pcfg, domains) -> dict:
  """Each domain's share as in a branch (1 - general_ratio split evenly), general data at the branch's ratio."""
  r = float(pcfg.branch.overrides.general_ratio)
  mix = {d: (1.0 - r) / len(domains) for d in domains}
  if r:
    mix["general"] = r
  return mix
