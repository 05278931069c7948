"""The evaluate stage: every domain's headline metric on one or more models, side by side.

Reads each model (an artifact dir of any kind — dense, branch, moe — or "smollm2", the packaged base straight from
its GGUF), runs bar_jax.evals.evaluate_model, and writes WORKDIR/eval.json (everything, per model) and
WORKDIR/eval.md (the table: rows = models, columns = domains, overall mean). Returns WORKDIR. eval.json records the
stage identity (bar_jax/io/workdir.py): the same config returns it, another one is refused.
"""
from __future__ import annotations

import json
import os
import time

from bar_jax.errors import BarError
from bar_jax.io import workdir as workdir_lib
from bar_jax.stages import common


def run(config, workdir: str) -> str:
  from bar_jax import evals
  from bar_jax.data import capability
  identity = workdir_lib.identity(config)
  if workdir_lib.resolve(workdir, identity, result_file=common.EVAL_JSON) == workdir_lib.FINISHED:
    return workdir
  specs = [s.strip() for s in str(config.model).split(",") if s.strip()]
  if not specs:
    raise BarError("config.model is empty: pass --config.model=DIR[,DIR2,...] or --config.model=smollm2")
  capability.resolve(config.domains)  # unknown names or bad specs fail before any model is loaded
  workdir_lib.start(workdir, identity)  # a run killed before eval.json resumes here
  rows = []
  for spec in specs:
    t0 = time.time()
    model = common.load_model(spec)
    cfg, compute = common.model_overrides(model.cfg, config.compute)
    report = evals.evaluate_model(model.params, cfg, model.tokenizer, config.domains,
                                  n_per_domain=config.n_per_domain, max_new_tokens=config.max_new_tokens,
                                  batch_size=config.batch_size, max_prompt_tokens=config.max_prompt_tokens,
                                  nll_seq_len=config.nll_seq_len, nll_batch_rows=config.nll_batch_rows,
                                  compute=compute)
    rows.append({"name": model.manifest.get("name", spec) if spec == common.SMOLLM2 else spec, "model": spec,
                 "kind": model.manifest.get("kind"), "fingerprint": model.manifest.get("fingerprint"),
                 "load_and_eval_seconds": round(time.time() - t0, 2), **report})
    print(f"evaluate: {spec}: overall {report['overall']:.1f} in {report['seconds']:.0f} s", flush=True)
  table = common.format_table(rows)
  workdir_lib.write_text_atomic(os.path.join(workdir, common.EVAL_MD), table)
  workdir_lib.write_text_atomic(os.path.join(workdir, common.EVAL_JSON),  # last: it marks the stage finished
                                json.dumps({"identity": identity, "models": rows}, indent=1, default=str))
  print(table, flush=True)
  return workdir
