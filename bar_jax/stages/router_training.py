"""Router training, shared by the router and upgrade stages: the stratified data sample, the router-only phase, the
bit-identity guard, eval and routing diagnostics, and the moe artifact they both write.

The data is a stratified `router.fraction` of each domain's SFT conversations plus general data (the paper: 5% of
the SFT data, 2 epochs, lr 1e-4, z-loss 0.001, no load-balance loss); steps = ceil(epochs * rows / batch), capped by
router.max_steps when > 0. Only layers/moe/router/kernel trains (its frozen_experts columns excepted), through
common.train_phase and so the one training loop.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import ml_collections

from bar_jax.errors import BarError
from bar_jax.io import artifact
from bar_jax.io import models
from bar_jax.model import transformer
from bar_jax.model.config import Compute
from bar_jax.stages import common
from bar_jax.transforms import freeze
from bar_jax.transforms import upgrade as upgrade_lib

GENERAL = "general"


def expert_domains(manifest: Mapping[str, Any]) -> list[str]:
  """The MoE's domain experts (the manifest's `experts` without the anchor)."""
  return [e for e in manifest.get("experts", [])[1:]]


def load_capabilities(manifest: Mapping[str, Any], names: Sequence[str], *, skip_missing: bool = False
                      ) -> tuple[list[str], list[str]]:
  """(found, missing) capability names: each read from the spec its manifest record names (the branch recorded it;
  merge and upgrade carry it in `capabilities`), else as a built-in or spec path. Missing ones stop with one line
  naming them and suggesting the local router update, unless skip_missing."""
  from bar_jax.data import capability
  records = dict(manifest.get("capabilities") or {})
  found, missing = [], []
  for n in dict.fromkeys(names):
    try:
      cap = capability.from_record(records[n], "router training") if n in records else capability.get(n)
      found.append(cap.name)
    except BarError as e:
      if not skip_missing:
        msg = str(e) if n in records else (f"router training needs capability {n!r}, which is neither a built-in nor "
                                           f"recorded in the MoE's manifest ({e}); pass its spec with "
                                           "--config.router.domains=..., or use --config.router_update=local")
        raise BarError(msg) from None
      missing.append(n)
  return found, missing


def data_domains(rc: ml_collections.ConfigDict, manifest: Mapping[str, Any]) -> list[str]:
  """router.domains ("" = every expert's capability plus general), each found through the manifest's capability
  records (or as a built-in name / spec path)."""
  names = list(rc.domains)
  if not names:
    names = expert_domains(manifest) + ([GENERAL] if rc.general else [])
  return load_capabilities(manifest, names)[0]


def sample_batches(tokenizer, fractions: Mapping[str, float], rc: ml_collections.ConfigDict, seed: int):
  """(pipeline.Batches over a stratified sample: fractions[d] of domain d's SFT conversations, rows in one epoch).

  Domains are mixed in proportion to their sample sizes, so the stream keeps the data's own domain shares.
  """
  from bar_jax.data import pipeline
  sample: dict[str, list] = {}
  for domain, fraction in fractions.items():
    got = pipeline.stratified_sample([domain], float(fraction), seed=seed)[domain]
    cap = int(rc.max_examples)
    sample[domain] = got[:cap] if cap else got
  sizes = {d: len(v) for d, v in sample.items()}
  spec = {"domains": sorted(sample), "fractions": dict(fractions), "examples": sizes, "split": "train",
          "stratified": True, "max_examples": int(rc.max_examples)}
  batches = pipeline.build(sample, sizes, tokenizer, kind="sft", seq_len=rc.seq_len, batch_size=rc.batch_size,
                           seed=seed, overlong=rc.overlong, spec=spec)
  rows = sum(s.rows for s in batches.stats.values())
  return batches, rows


def router_phase(rc: ml_collections.ConfigDict, rows: int) -> ml_collections.ConfigDict:
  """The train_phase config: steps from epochs over the sample (capped by max_steps), the router's optimiser."""
  steps = max(1, math.ceil(float(rc.epochs) * rows / rc.batch_size))
  if rc.max_steps:
    steps = min(steps, int(rc.max_steps))
  opt = ml_collections.ConfigDict(rc.opt.to_dict())
  opt.warmup_steps = int(round(float(rc.warmup_frac) * steps))
  return ml_collections.ConfigDict(dict(
      data=dict(kind="sft", seq_len=rc.seq_len, mix={}), batch_size=rc.batch_size, accum=rc.accum,
      steps=steps, opt=opt, z_loss=rc.z_loss, lb_loss=rc.lb_loss, epochs=rc.epochs,
      checkpoint_every=rc.checkpoint_every, log_every=rc.log_every, divergence_factor=rc.divergence_factor))


def calibration_batches(tokenizer, fractions: Mapping[str, float], experts: Sequence[str],
                        rc: ml_collections.ConfigDict, seed: int) -> list[dict]:
  """The router init's labelled tokens: from the same stratified sample router training draws (train split),
  rc.init_rows packed rows of rc.init_seq_len per domain, the system prompt masked out; each token labelled with
  its domain's expert index (general data, and any domain without an expert of its own: the anchor, 0)."""
  import numpy as np
  from bar_jax.data import pipeline
  from bar_jax.evals import routing as routing_lib
  out = []
  for domain, fraction in fractions.items():
    convs = pipeline.stratified_sample([domain], float(fraction), seed=seed)[domain]
    rows = routing_lib.conversation_rows(tokenizer, convs, seq_len=int(rc.init_seq_len), max_rows=int(rc.init_rows))
    if not len(rows["inputs"]):
      raise BarError(f"router init: domain {domain}'s sample holds fewer than {rc.init_seq_len} tokens; raise "
                     "router.fraction or lower router.init_seq_len")
    label = list(experts).index(domain) if domain in experts[1:] else 0
    for i in range(0, len(rows["inputs"]), int(rc.batch_size)):
      b = {k: v[i:i + int(rc.batch_size)] for k, v in rows.items()}
      b["labels"] = np.full(b["inputs"].shape, label, np.int32)
      out.append(b)
  return out


def init_router(model: models.Model, cfg, params, rc: ml_collections.ConfigDict, fractions: Mapping[str, float],
                experts: Sequence[str], *, seed: int, compute: Compute = Compute()) -> tuple[Any, dict]:
  """rc.init's router (transforms/router_init.py) fitted on calibration_batches; returns (params, record)."""
  import time
  from bar_jax.transforms import router_init
  if rc.init == "merged":
    return params, {}
  if rc.init not in router_init.METHODS:
    raise BarError(f"router.init={rc.init!r}: use one of {router_init.METHODS}")
  start = time.time()
  batches = calibration_batches(model.tokenizer, fractions, experts, rc, seed)
  params, layers = router_init.fit(models.to_host(params), cfg, batches, rc.init, ridge=float(rc.init_ridge),
                                   max_logit=float(rc.init_max_logit), compute=compute)
  tokens = int(sum(b["mask"].sum() for b in batches))
  return params, {"stage": "router_init", "method": rc.init, "tokens": tokens, "steps": 0,
                  "flops": float(sum(b["inputs"].size for b in batches) * 2 * 2
                                 * transformer.active_matmul_params(cfg)),  # two forward passes per layer
                  "seconds": round(time.time() - start, 1), "layers": layers}


def train_router(model: models.Model, cfg, params, rc: ml_collections.ConfigDict, fractions: Mapping[str, float],
                 workdir: str, mesh, *, seed: int, identity: dict, name: str = "router",
                 frozen_experts: Sequence[int] = (), compute: Compute = Compute(),
                 experts: Sequence[str] | None = None, checkpoint_fallback: bool = False) -> tuple[Any, dict]:
  """Only the router kernel trains (its frozen_experts columns excepted), after rc.init sets its columns from data
  (`init_router`; experts names the MoE's experts, anchor first); rc.epochs = 0 trains nothing (a pure closed-form
  router). Returns (params, stage record; an init's record under "init")."""
  init_record = {}
  if rc.get("init", "merged") != "merged":
    if frozen_experts:
      raise BarError(f"router.init={rc.init!r} rewrites every column, but columns {list(frozen_experts)} are frozen "
                     "here: use router.init=merged with a local router update")
    params, init_record = init_router(model, cfg, params, rc, fractions, experts or [], seed=seed, compute=compute)
  if float(rc.epochs) == 0:
    return models.to_host(params), {"stage": name, "steps": 0, "tokens": 0, "flops": init_record.get("flops", 0.0),
                                    "init": init_record, "data": {"fractions": dict(fractions)}}
  batches, rows = sample_batches(model.tokenizer, fractions, rc, seed)
  phase = router_phase(rc, rows)
  params, record = common.train_phase(name=name, model=model, cfg=cfg, params=params, phase=phase, workdir=workdir,
                                      mesh=mesh, seed=seed, identity=identity,
                                      trainable=list(freeze.SCHEDULE["router"]), frozen_experts=list(frozen_experts),
                                      batches=batches, compute=compute, checkpoint_fallback=checkpoint_fallback)
  # max_steps may cut the configured epochs short: record the passes actually made over the sample.
  record.update(sample_rows=rows, epochs_configured=float(rc.epochs),
                epochs=round(phase.steps * rc.batch_size / max(rows, 1), 4), init=init_record)
  record["flops"] = record["flops"] + init_record.get("flops", 0.0)
  return models.to_host(params), record


def check_only_router_changed(before, after, cfg, allowed_experts: Sequence[int] = ()) -> None:
  """Guard before writing: every leaf but the router kernel is bit-identical; inside expert-stacked leaves only
  `allowed_experts`' slices may differ (the replaced or added expert)."""
  fb, fa = artifact.leaf_fingerprints(before), artifact.leaf_fingerprints(after)
  ef_b, ef_a = upgrade_lib.expert_fingerprints(before, cfg), upgrade_lib.expert_fingerprints(after, cfg)
  for path in sorted(set(fb) | set(fa)):
    if path == upgrade_lib.ROUTER or path.startswith((upgrade_lib.EXPERTS, upgrade_lib.LORA)):
      continue
    if fb.get(path) != fa.get(path):
      raise RuntimeError(f"bug: frozen leaf {path} changed during router training; nothing was written")
  bad = [e for e in upgrade_lib.changed_experts(ef_b, ef_a) if e not in allowed_experts]
  if bad:
    raise RuntimeError(f"bug: experts {bad} changed during router training; nothing was written")


def eval_domains(config, experts: Sequence[str]) -> list[str]:
  """config.eval.domains (a typed list: [] = none, ["auto"] = the experts' domains + general)."""
  domains = list(config.eval.domains)
  if domains == ["auto"]:
    return list(dict.fromkeys(list(experts) + [GENERAL]))
  return domains


def evaluate(config, cfg, params, tokenizer, mesh, experts: Sequence[str], compute: Compute = Compute()) -> dict:
  domains = eval_domains(config, experts)
  if not domains:
    return {}
  from bar_jax import evals
  ev = config.eval
  return evals.evaluate_model(params, cfg, tokenizer, domains, n_per_domain=ev.n_per_domain,
                              max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, mesh=mesh, compute=compute)


def routing(config, cfg, params, tokenizer, mesh, names: Sequence[str], domains: Sequence[str],
            compute: Compute = Compute()) -> dict:
  from bar_jax.evals import routing as routing_lib
  r = config.routing
  rows = routing_lib.domain_rows(tokenizer, domains, seq_len=r.seq_len, max_rows=r.max_rows)
  return routing_lib.routing_stats(params, cfg, rows, batch_size=r.batch_size, mesh=mesh, names=names, compute=compute)


def finish(config, workdir: str, model: models.Model, cfg, params, stages: list[dict], parents: list[dict],
           experts: list[str], mesh, *, identity: dict, metrics_before: dict, compute: Compute = Compute(),
           **fields) -> str:
  """Routing diagnostics (routing.json/png), eval after, then the moe artifact (manifest last)."""
  from bar_jax.evals import routing as routing_lib
  missing = set(fields.get("capabilities_missing") or ())  # upgrade without a full router update: specs not found
  domains = list(dict.fromkeys([d for d in experts[1:] if d not in missing] + [GENERAL]))
  report = routing(config, cfg, params, model.tokenizer, mesh, experts, domains, compute) \
      if config.routing.max_rows else {}
  if report:
    routing_lib.write(report, workdir)
  metrics = evaluate(config, cfg, params, model.tokenizer, mesh, [e for e in experts[1:] if e not in missing], compute)
  return models.write_artifact(
      workdir, model, params, cfg, "moe", stages, parents, identity=identity,
      keep_checkpoints=config.keep_checkpoints, experts=experts,
      base_fingerprint=model.manifest.get("base_fingerprint"), metrics=metrics, metrics_before=metrics_before,
      routing=routing_lib.summary(report) if report else {}, expert_fingerprints=upgrade_lib.expert_fingerprints(
          params, cfg), **fields)


def load_moe(spec: str, what: str = "config.model") -> models.Model:
  if not spec:
    raise BarError(f"{what} is empty: pass --{what}=DIR, an moe artifact written by the merge stage")
  model = models.load_model(spec)
  if model.manifest.get("kind") != "moe":
    raise BarError(f"{spec} is a {model.manifest.get('kind')!r} artifact, not an moe: pass the merge stage's output")
  return model
