"""The export_hf stage: a bar_jax artifact (dense, branch or merged MoE) -> a Hugging Face model directory.

  python -m bar_jax.train --config=configs/export_hf.py --config.model=runs/moe --workdir=runs/moe_hf

A dense model becomes a LlamaForCausalLM directory, an MoE (a merged model, or a 2-expert branch) a
MixtralForCausalLM one (LoRA experts materialised); see bar_jax/io/hf.py for the top-k mapping. The source artifact is
verified against its fingerprints first; the HF directory is written atomically and never over an existing one.
WORKDIR follows the workdir contract (bar_jax/io/workdir.py; bar_jax_export.json records the identity).
"""
from __future__ import annotations

import os

from bar_jax import stage_configs
from bar_jax.errors import BarError
from bar_jax.io import artifact, hf
from bar_jax.io import workdir as workdir_lib


def run(config, workdir: str) -> str:
  config, identity, state = stage_configs.begin(config, workdir, hf.PROVENANCE_FILE)
  if state == workdir_lib.FINISHED:
    return workdir
  source = config.model
  if not source:
    raise BarError("no model to export: pass --config.model=<artifact dir>")
  art = artifact.read(source, verify=config.verify)
  provenance = {"source": os.path.basename(os.path.normpath(source)), "fingerprint": art.fingerprint,
                "kind": art.manifest.get("kind"), "experts": art.manifest.get("experts"),
                "model": art.cfg.to_dict(), "identity": identity}
  max_shard_bytes = int(config.max_shard_gb * 2**30)
  return hf.save_dir(workdir, art.cfg, art.params, art.tokenizer, provenance=provenance,
                     max_shard_bytes=max_shard_bytes)
