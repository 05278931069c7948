"""The export_hf stage: a bar_jax artifact (dense, branch or merged MoE) -> a Hugging Face model directory.

  python -m bar_jax.train --config=configs/export_hf.py --config.model=runs/moe --workdir=runs/moe_hf

A dense model becomes a LlamaForCausalLM directory, an MoE (a merged model, or a 2-expert branch) a
MixtralForCausalLM one (LoRA experts materialised); see bar_jax/io/hf.py for the top-k mapping. The source artifact is
verified against its fingerprints first; the HF directory is written atomically and never over an existing one.
"""
from __future__ import annotations

import os

from bar_jax.errors import BarError
from bar_jax.io import artifact, hf


def run(config, workdir: str) -> str:
  source = config.get("model", "")
  if not source:
    raise BarError("no model to export: pass --config.model=<artifact dir>")
  if os.path.exists(workdir) and os.listdir(workdir):
    raise BarError(f"{workdir} is not empty; choose a new --workdir for the Hugging Face directory")
  art = artifact.read(source, verify=config.get("verify", True))
  provenance = {"source": os.path.basename(os.path.normpath(source)), "fingerprint": art.fingerprint,
                "kind": art.manifest.get("kind"), "experts": art.manifest.get("experts"),
                "model": art.cfg.to_dict()}
  max_shard_bytes = int(config.get("max_shard_gb", 5.0) * 2**30)
  return hf.save_dir(workdir, art.cfg, art.params, art.tokenizer, provenance=provenance,
                     max_shard_bytes=max_shard_bytes)
