"""The evaluate stage: every domain's headline metric on one or more models, side by side.

Reads each model (an artifact dir of any kind — dense, branch, moe — or "smollm2", the packaged base straight from
its GGUF), runs bar_jax.evals.evaluate_model, and writes WORKDIR/eval.json (everything, per model) and
WORKDIR/eval.md (the table: rows = models, columns = domains, overall mean). Returns WORKDIR. eval.json records the
stage identity (bar_jax/io/workdir.py): the same config returns it, another one is refused.

Per domain, each model's result is also kept in config.cache_dir (default WORKDIR/../eval_cache, shared by the
evaluations beside this one) under a key of everything that decides it: the model's fingerprint, the capability's
fingerprint (its data and metric), the protocol and the stage's scoring settings (all of the identity but the model
and domain lists). Re-scoring a model on more domains, or a killed run, recomputes only the domains no finished
evaluation with those settings has scored; a changed setting or model misses the cache, so no score is stale.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

from bar_jax import stage_configs
from bar_jax.errors import BarError
from bar_jax.evals import protocol, report
from bar_jax.io import models
from bar_jax.io import workdir as workdir_lib
from bar_jax.stages import common


def run(config, workdir: str) -> str:
  from bar_jax.data import capability
  config, identity, state = stage_configs.begin(config, workdir, common.EVAL_JSON)
  if state == workdir_lib.FINISHED:
    return workdir
  specs = list(config.model)
  capability.resolve(config.domains)  # unknown names or bad specs fail before any model is loaded
  if int(config.get("protocol", 0)) != protocol.VERSION:
    raise BarError(f"config.protocol={config.get('protocol')} but this bar_jax evaluates protocol "
                   f"{protocol.VERSION} (bar_jax/evals/protocol.py): leave the key at its default")
  workdir_lib.start(workdir, identity)  # a run killed before eval.json resumes here
  drift_set = _drift_set(config, workdir)
  rows = []
  for spec in specs:
    t0 = time.time()
    model = models.load_model(spec)
    cfg, compute = common.model_overrides(model.cfg, config.compute, config.moe)
    result = _evaluate_domains(config, identity, workdir, model, cfg, compute)
    if drift_set is not None:
      from bar_jax.evals import drift
      t1 = time.time()
      result["domains"]["drift"] = dict(drift.score(model.params, cfg, model.tokenizer, drift_set,
                                                    batch_size=config.nll_batch_rows, seq_len=config.nll_seq_len,
                                                    compute=compute), seconds=round(time.time() - t1, 2))
    rows.append({"name": model.manifest.get("name", spec) if spec == models.SMOLLM2 else spec, "model": spec,
                 "kind": model.manifest.get("kind"), "fingerprint": model.manifest.get("fingerprint"),
                 "load_and_eval_seconds": round(time.time() - t0, 2), **result})
    print(f"evaluate: {spec}: overall {result['overall']:.1f} in {result['seconds']:.0f} s", flush=True)
  table = report.format_table(rows)
  workdir_lib.write_text_atomic(os.path.join(workdir, common.EVAL_MD), table)
  workdir_lib.write_text_atomic(os.path.join(workdir, common.EVAL_JSON),  # last: it marks the stage finished
                                json.dumps({"identity": identity, "models": rows}, indent=1, default=str))
  print(table, flush=True)
  return workdir


def _domain_key(identity: dict, fingerprint: str, capability_fingerprint: str) -> str:
  """The cache key of one model's score on one domain: the identity without its model and domain lists."""
  settings = {k: v for k, v in identity.items() if k not in ("model", "domains", "drift_base", "drift_n",
                                                              "drift_tokens")}
  payload = json.dumps({"settings": settings, "model": fingerprint, "capability": capability_fingerprint},
                       sort_keys=True, default=str)
  return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _evaluate_domains(config, identity, workdir, model, cfg, compute) -> dict:
  """evaluate_model's report for config.domains, each domain read from the cache when a finished evaluation with
  the same key scored it, else computed and added to the cache."""
  from bar_jax import evals
  from bar_jax.data import capability
  from bar_jax.evals import runner
  root = str(config.cache_dir) or os.path.join(os.path.dirname(os.path.abspath(workdir)), "eval_cache")
  t0 = time.time()
  fingerprint = str(model.manifest.get("fingerprint", ""))
  settings = dict(n_per_domain=config.n_per_domain, max_new_tokens=config.max_new_tokens,
                  batch_size=config.batch_size, max_prompt_tokens=config.max_prompt_tokens,
                  nll_seq_len=config.nll_seq_len, nll_batch_rows=config.nll_batch_rows)
  domains, cached = {}, []
  for domain in capability.resolve(config.domains):
    path = os.path.join(root, f"{_domain_key(identity, fingerprint, domain.fingerprint)}.json")
    if fingerprint and os.path.exists(path):
      with open(path) as f:
        domains[domain.name] = json.load(f)["result"]
      cached.append(domain.name)
      continue
    one = evals.evaluate_model(model.params, cfg, model.tokenizer, [domain.name], **settings, compute=compute)
    domains[domain.name] = one["domains"][domain.name]
    if fingerprint:  # a model without a fingerprint (none today) is never cached
      os.makedirs(root, exist_ok=True)
      workdir_lib.write_text_atomic(path, json.dumps({"model": fingerprint, "domain": domain.name,
                                                      "result": domains[domain.name]}, default=str))
  report: dict = {"domains": domains}
  report["overall"], report["overall_ci"] = runner.overall(domains)
  report["settings"] = runner.report_settings(**settings)
  report["cached_domains"] = cached
  report["seconds"] = round(time.time() - t0, 2)
  return report


def _drift_set(config, workdir: str) -> dict | None:
  """The drift set of config.drift_base (made from it once, then read: bar_jax/evals/drift.py), or None when off."""
  base = str(config.get("drift_base", "") or "")
  if not base:
    return None
  from bar_jax.evals import drift
  root = str(config.drift_dir) or os.path.join(os.path.dirname(os.path.abspath(workdir)), "drift")
  loaded: list = []

  def load():
    if not loaded:
      loaded.append(models.load_model(base))
    return loaded[0]
  fingerprint = workdir_lib.input_fingerprint(base)
  if fingerprint == base:  # a packaged name: the loaded model's own fingerprint
    fingerprint = load().manifest.get("fingerprint", "")

  def model_fn():
    m = load()
    cfg, compute = common.model_overrides(m.cfg, config.compute)
    return m.params, cfg, m.tokenizer, compute
  return drift.drift_set(root, fingerprint, model_fn, n=int(config.drift_n), max_new_tokens=int(config.drift_tokens),
                         batch_size=int(config.batch_size))
