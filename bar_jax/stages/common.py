"""What the training and evaluating stages share: a loaded model's run-time overrides, a phase's data, one training
phase with its manifest record, the manifest's evaluation. Stages stay flat files that read top to bottom; the
plumbing lives here once. Loading and writing models: bar_jax/io/models.py; the mesh: sharding.mesh_from."""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import ml_collections

from bar_jax import sharding, stage_configs
from bar_jax.errors import BarError
from bar_jax.fingerprints import config_hash
from bar_jax.io.models import Model
from bar_jax.model import transformer
from bar_jax.model.config import Compute, ModelConfig, split_overrides
from bar_jax.stages import loop
from bar_jax.transforms import freeze

EVAL_JSON, EVAL_MD = "eval.json", "eval.md"  # the evaluate stage's files (the pipeline and experiments read them)


def model_overrides(cfg: ModelConfig, compute: Compute | Mapping, moe: Any = None) -> tuple[ModelConfig, Compute]:
  """A typed config's `compute` and `moe` applied to a loaded model: (cfg with the routing of `moe` (top_k,
  norm_topk; a None field keeps the model's own), the run's Compute). Only the first is ever written into a
  manifest. A plain mapping for `compute` (experiments' older calls) may still carry the routing keys."""
  arch = {}
  if not isinstance(compute, Compute):
    d = dict(compute.to_dict() if hasattr(compute, "to_dict") else compute)
    arch, rest = split_overrides({k: v for k, v in d.items() if v is not None})
    try:
      compute = Compute(**rest)
    except TypeError as e:
      raise BarError(f"config.compute has a key Compute does not know ({e}); see bar_jax/model/config.py") from None
  if moe is not None:
    arch.update({k: v for k, v in (moe.to_dict() if hasattr(moe, "to_dict") else dict(moe)).items()
                 if v is not None})
  try:
    return cfg.replace(**arch).validate(), compute.validate()
  except (TypeError, ValueError) as e:
    raise BarError(str(e)) from None


def data_batches(data: ml_collections.ConfigDict, tokenizer, *, seed: int, batch_size: int):
  """Build the grain pipeline a phase trains on: kind lm|sft, domain weights (the general-data ratio lives here)."""
  from bar_jax.data import pipeline
  weights = {k: float(v) for k, v in data.mix.items() if float(v) > 0}
  if not weights:
    raise BarError("data.mix gives no domain a positive weight; e.g. --config.data.mix.general=1.0")
  pc = jax.process_count()
  if batch_size % pc:
    raise BarError(f"batch_size {batch_size} is not divisible by the {pc} processes")
  fn = pipeline.lm_batches if data.kind == "lm" else pipeline.sft_batches
  if data.kind not in ("lm", "sft"):
    raise BarError(f"data.kind={data.kind!r}: use 'lm' (mid-training text) or 'sft' (chat)")
  return fn(weights, tokenizer, seq_len=data.seq_len, batch_size=batch_size // pc, seed=seed,
            max_examples=data.max_examples)


def train_phase(*, name: str, model: Model, cfg: ModelConfig, params: Any, phase: ml_collections.ConfigDict,
                workdir: str, mesh, seed: int, identity: dict, trainable, frozen_experts=(0,),
                batches=None, compute: Compute = Compute(), checkpoint_fallback: bool = False) -> tuple[Any, dict]:
  """One training phase (mid-training, SFT, dense LM, router): data, partition, loop.train; returns (params, record).

  identity: the stage's identity (bar_jax/io/workdir.py); the phase's checkpoints are claimed for it and the phase
  name. batches: an already built pipeline.Batches (e.g. the router's stratified sample) instead of phase.data's mix.
  The record goes into the artifact manifest's `stages`: steps, tokens, FLOPs, data fingerprint, config, curve ends.
  """
  batch_size, accum = phase.batch_size, phase.accum
  per_micro, div = batch_size // max(accum, 1), sharding.batch_divisor(mesh)
  if batch_size % accum or per_micro % div:
    raise BarError(f"{name}: batch_size {batch_size} / accum {accum} must be a whole multiple of the mesh's "
                   f"{div} batch shards (data x fsdp x expert); change batch_size, accum or config.mesh")
  data = batches or data_batches(phase.data, model.tokenizer, seed=seed, batch_size=batch_size)
  it = data.iterator()
  patterns = list(trainable)
  part = freeze.make_partition(params, cfg, patterns, frozen_experts)
  phase_dir = os.path.join(workdir, "phases", name)
  result = loop.train(params=params, cfg=cfg, part=part,
                      loss_fn=loop.lm_loss(cfg, mesh, z_loss=phase.z_loss, lb_loss=phase.lb_loss, compute=compute),
                      batches=it,
                      opt=phase.opt, steps=phase.steps, workdir=phase_dir, mesh=mesh,
                      identity={"stage": identity, "phase": name}, accum=accum,
                      checkpoint_every=phase.checkpoint_every, log_every=phase.log_every, desc=name, data_iter=it,
                      divergence_factor=phase.divergence_factor, checkpoint_fallback=checkpoint_fallback)
  tokens = float(phase.steps * batch_size * phase.data.seq_len)
  trainable_tree, _ = freeze.split(params, part)
  record = {
      "stage": name, "steps": phase.steps, "tokens": tokens,
      "flops": tokens * transformer.train_flops_per_token(cfg, phase.data.seq_len),
      "loss_tokens": result.tokens, "trainable_params": freeze.count(trainable_tree),
      "data": data.spec, "data_fingerprint": config_hash(data.spec), "data_stats": data.summary(),
      "trainable": patterns, "frozen_experts": list(frozen_experts), "seconds": round(result.seconds, 1),
      "loss_first": result.history[0]["loss"] if result.history else None,
      "loss_last": result.history[-1]["loss"] if result.history else None,
      "config": stage_configs.strip_runtime(phase.to_dict()),
  }
  return result.params, record


def evaluate(config, cfg: ModelConfig, params: Any, tokenizer, mesh, compute: Compute = Compute(),
             domains=None) -> dict:
  """The capability metrics of config.eval (empty when eval.domains is the empty list), for the manifest; `domains`
  (names or spec paths) overrides eval.domains."""
  ev = config.eval
  domains = list(ev.domains if domains is None else domains)
  if not domains:
    return {}
  from bar_jax import evals
  return evals.evaluate_model(params, cfg, tokenizer, domains, n_per_domain=ev.n_per_domain,
                              max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, mesh=mesh,
                              compute=compute)
