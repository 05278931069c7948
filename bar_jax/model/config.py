"""What a model computes, apart from how a run computes it.

`ModelConfig` is the architecture: every field changes the function the parameters define (shapes, norms, RoPE,
experts and their routing). It is stored verbatim in every artifact's manifest, and merge and upgrade compare it.
The same config describes a dense Llama-family model, a 2-expert branch, and an N-expert merged MoE; only the FFN
fields differ.

`Compute` is how one run evaluates that function (activation dtype, rematerialisation, attention kernel, MoE dispatch
path and capacity): a run-time choice passed to `transformer.forward` and `generate`, never written into a manifest
and never inherited by a merge. Both are frozen and hashable, so jitted functions take them as static arguments.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 49152
  d_model: int = 576
  n_layers: int = 30
  n_heads: int = 9
  n_kv_heads: int = 3
  head_dim: int = 64
  d_ff: int = 1536
  rms_eps: float = 1e-5
  rope_theta: float = 100000.0
  rope_style: str = "half"          # "half" (Hugging Face) | "interleaved" (GGUF / Meta)
  # RoPE frequency scaling: "default" (none) | "llama3" (Llama 3.1+: long wavelengths divided by rope_factor, a
  # smooth ramp between the two wavelength bounds set by the low/high frequency factors).
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  qkv_bias: bool = False            # biases on the q/k/v projections (Qwen 2 / 2.5)
  qk_norm: str = "none"             # RMSNorm on q and k before RoPE: "none" | "head" (over each head: Qwen 3) |
                                    # "proj" (over the whole q or k projection: OLMo 2)
  norm_position: str = "pre"        # "pre": x + f(norm(x)) (Llama, Qwen) | "post": x + norm(f(x)) (OLMo 2)
  tie_embeddings: bool = True
  max_seq_len: int = 8192
  # FFN slot.
  ffn: str = "dense"                # "dense" | "moe"
  n_experts: int = 1                # E, anchor included (branch: 2; merged: N + 1)
  expert_kind: str = "ffn"          # "ffn" (full FFN per expert) | "lora" (anchor + low-rank delta per expert)
  lora_rank: int = 16
  lora_alpha: float = 32.0
  top_k: int = 0                    # 0 means all experts (the paper's setting)
  norm_topk: bool = False           # renormalise the chosen router probabilities

  @property
  def k(self) -> int:
    """Experts per token."""
    return self.top_k if self.top_k else self.n_experts

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """From a manifest's "model" entry; manifests written before Compute existed are migrated on the way in."""
    d = migrate_model_dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}: this artifact was written by a newer bar_jax; upgrade it")
    return cls(**d)

  def validate(self) -> "ModelConfig":
    problems = []
    if self.n_heads % self.n_kv_heads:
      problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.ffn not in ("dense", "moe"):
      problems.append(f"ffn={self.ffn!r} (use 'dense' or 'moe')")
    if self.ffn == "moe":
      if self.expert_kind not in ("ffn", "lora"):
        problems.append(f"expert_kind={self.expert_kind!r} (use 'ffn' or 'lora')")
      if not 0 <= self.top_k <= self.n_experts:
        problems.append(f"top_k={self.top_k} is outside 0..n_experts={self.n_experts}")
    if self.rope_style not in ("half", "interleaved"):
      problems.append(f"rope_style={self.rope_style!r} (use 'half' or 'interleaved')")
    if self.rope_type not in ("default", "llama3"):
      problems.append(f"rope_type={self.rope_type!r} (use 'default' or 'llama3')")
    if self.rope_type == "llama3" and not (self.rope_factor >= 1 and
                                            0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
      problems.append(f"llama3 RoPE needs rope_factor >= 1 and 0 < rope_low_freq_factor < rope_high_freq_factor "
                      f"(got {self.rope_factor}, {self.rope_low_freq_factor}, {self.rope_high_freq_factor})")
    if self.qk_norm not in ("none", "head", "proj"):
      problems.append(f"qk_norm={self.qk_norm!r} (use 'none', 'head' or 'proj')")
    if self.norm_position not in ("pre", "post"):
      problems.append(f"norm_position={self.norm_position!r} (use 'pre' or 'post')")
    if problems:
      raise ValueError("invalid model config: " + "; ".join(problems))
    return self


@dataclasses.dataclass(frozen=True)
class Compute:
  """How a run evaluates the model; the result is the same function up to rounding (and expert_parallel drops)."""
  dtype: str = "float32"            # activation / matmul dtype; parameters stay float32
  remat: str = "none"               # "none" | "full" | "dots" (jax.checkpoint policy for each scanned layer)
  attention: str = "xla"            # "xla" | "cudnn" | "splash" | "auto" (per backend: bar_jax/model/attention.py)
  dispatch: str = "dense"           # MoE only: "dense" | "dropless" | "expert_parallel"
  capacity_factor: float = 0.0      # expert_parallel only; 0 = no drops (capacity = all tokens)

  def replace(self, **kw) -> "Compute":
    return dataclasses.replace(self, **kw)

  def validate(self) -> "Compute":
    problems = []
    if self.dtype not in ("float32", "bfloat16"):
      problems.append(f"dtype={self.dtype!r} (use 'float32' or 'bfloat16')")
    if self.remat not in ("none", "full", "dots"):
      problems.append(f"remat={self.remat!r} (use 'none', 'full' or 'dots')")
    if self.attention not in ("xla", "cudnn", "splash", "auto"):
      problems.append(f"attention={self.attention!r} (use 'xla', 'cudnn', 'splash' or 'auto')")
    if self.dispatch not in ("dense", "dropless", "expert_parallel"):
      problems.append(f"dispatch={self.dispatch!r} (use 'dense', 'dropless' or 'expert_parallel')")
    if self.capacity_factor < 0:
      problems.append(f"capacity_factor={self.capacity_factor} (use 0 for no drops, or a positive factor)")
    if problems:
      raise ValueError("invalid compute config: " + "; ".join(problems))
    return self


COMPUTE_KEYS = tuple(f.name for f in dataclasses.fields(Compute))


def migrate_model_dict(d: dict[str, Any]) -> dict[str, Any]:
  """A manifest's "model" entry as ModelConfig reads it. Manifests written before the architecture/compute split
  held the Compute fields too; they say nothing about the function, so they are dropped."""
  return {k: v for k, v in d.items() if k not in COMPUTE_KEYS}


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """A config's `compute` section -> (ModelConfig fields it changes, e.g. top_k; Compute fields)."""
  arch = {k: v for k, v in overrides.items() if k not in COMPUTE_KEYS}
  return arch, {k: v for k, v in overrides.items() if k in COMPUTE_KEYS}


def tiny(**kw) -> ModelConfig:
  """A random-weight model for unit tests only (compiles in about a second)."""
  base = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
              max_seq_len=128, rope_theta=10000.0)
  base.update(kw)
  return ModelConfig(**base).validate()
