"""Hugging Face import and export: Llama 3.x, Qwen 2/2.5, Qwen 3 and OLMo 2 (dense) and their MoE classes <-> the
parameter dict.

Import (`load_dir`) reads config.json + *.safetensors (one file or a sharded index) with safetensors and builds each
parameter leaf straight into a (optionally sharded) jax array: with a sharding, every device's block is read from
disk by itself (`jax.make_array_from_callback` + safetensors slices), so a big model never sits whole on one host
device. HF Linear weights are [out, in]; ours are [in, out], with layers (and experts) stacked on leading axes.

Families are data (`FAMILIES`): each HF architecture fixes the ModelConfig attention/norm fields it implies, and each
dense family has one MoE class with the same attention and norms, which export writes for a branch or a merged MoE:

  dense class        what differs from Llama                                   MoE export class
  LlamaForCausalLM   (rope_type "default" or "llama3")                         MixtralForCausalLM
  Qwen2ForCausalLM   q/k/v biases                                              Qwen2MoeForCausalLM (+ zero shared exp.)
  Qwen3ForCausalLM   RMSNorm on each q/k head                                  Qwen3MoeForCausalLM
  Olmo2ForCausalLM   RMSNorm on the whole q/k projection, norms after sub-layers  FlexOlmoForCausalLM

Top-k mapping: bar_jax routes with softmax over all E experts, keeps the top_k, and renormalises the kept
probabilities only when norm_topk=True. FlexOlmo and the Qwen MoE classes do exactly that (their `norm_topk_prob`
switch), so every routing setting exports. Mixtral always renormalises its top-k softmax, so it agrees when
norm_topk=True or top_k = E (the paper's setting: all experts, whose softmax already sums to one); a Llama-base MoE
with norm_topk=False and top_k < E has no HF class (every MoE class with that switch adds QK-norm, biases or a
shared expert a Llama MoE lacks) and export refuses. Qwen2-MoE always adds a sigmoid-gated shared expert: export
writes one of width 1 with all-zero weights, whose output is exactly zero; import accepts a Qwen2-MoE directory only
when its shared expert is zero that way. LoRA experts are materialised (anchor + delta) first, since no HF MoE class
has per-expert adapters. Import maps Mixtral back with top_k = k and norm_topk = (k < E).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import jax
import numpy as np

from bar_jax.errors import BarError
from bar_jax.model import moe, transformer
from bar_jax.model.config import ModelConfig

Params = dict[str, Any]
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
PROVENANCE_FILE = "bar_jax_export.json"
MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed by every loader


# ----------------------------------------------------------------------------------------------------------------
# Name mapping: one `_Source` per parameter leaf says which HF tensors it is stacked from and how they are laid out.

@dataclasses.dataclass(frozen=True)
class _Source:
  name: Callable[..., str]          # lead indices (layer, expert) -> HF tensor name
  lead: tuple[int, ...]             # stacked leading axes: () | (L,) | (L, E)
  hf_shape: tuple[int, ...]         # the full shape of each HF tensor, as it is stored
  perm: tuple[int, ...]             # our trailing axes = the HF tensor's axes in this order
  offset: tuple[int, ...] = ()      # the part read: start and size along each HF axis (default: all of it);
  size: tuple[int, ...] = ()        # gate and up are the two halves of a fused gate_up tensor

  @property
  def region(self) -> tuple[int, ...]:
    return self.size or self.hf_shape

  @property
  def shape(self) -> tuple[int, ...]:
    return self.lead + tuple(self.region[a] for a in self.perm)


def _sources(cfg: ModelConfig, moe_layout: str = "mixtral") -> Params:
  """The parameter tree with a `_Source` at every leaf. moe_layout: 'mixtral' (block_sparse_moe.experts.{e}.w1),
  'per_expert' (mlp.experts.{e}.gate_proj: Qwen MoE, FlexOlmo) or 'fused' (transformers 5's in-memory gate_up_proj)."""
  L, D, F, V, E = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_experts
  qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  T, I = (1, 0), (0,)  # transpose a Linear weight; keep a vector

  def layer(suffix: str, hf_shape, perm) -> _Source:
    return _Source(lambda l: f"model.layers.{l}.{suffix}", (L,), hf_shape, perm)

  # The same two norm leaves sit before the sub-layers (Llama, Qwen) or after them (OLMo 2), under other HF names.
  attn_norm, mlp_norm = (("input_layernorm", "post_attention_layernorm") if cfg.norm_position == "pre" else
                         ("post_attention_layernorm", "post_feedforward_layernorm"))
  layers: Params = {
      "attn_norm": {"scale": layer(f"{attn_norm}.weight", (D,), I)},
      "attn": {"q": {"kernel": layer("self_attn.q_proj.weight", (qd, D), T)},
               "k": {"kernel": layer("self_attn.k_proj.weight", (kvd, D), T)},
               "v": {"kernel": layer("self_attn.v_proj.weight", (kvd, D), T)},
               "o": {"kernel": layer("self_attn.o_proj.weight", (D, qd), T)}},
      "mlp_norm": {"scale": layer(f"{mlp_norm}.weight", (D,), I)},
  }
  if cfg.qkv_bias:
    for name, width in (("q", qd), ("k", kvd), ("v", kvd)):
      layers["attn"][name]["bias"] = layer(f"self_attn.{name}_proj.bias", (width,), I)
  if cfg.qk_norm != "none":
    per_head = cfg.qk_norm == "head"
    layers["attn"]["q_norm"] = {"scale": layer("self_attn.q_norm.weight", (cfg.head_dim if per_head else qd,), I)}
    layers["attn"]["k_norm"] = {"scale": layer("self_attn.k_norm.weight", (cfg.head_dim if per_head else kvd,), I)}
  if cfg.ffn == "dense":
    layers["mlp"] = {"gate": {"kernel": layer("mlp.gate_proj.weight", (F, D), T)},
                     "up": {"kernel": layer("mlp.up_proj.weight", (F, D), T)},
                     "down": {"kernel": layer("mlp.down_proj.weight", (D, F), T)}}
  elif moe_layout in ("mixtral", "per_expert"):  # what checkpoints ship and what save_dir writes
    block, (w1, w3, w2) = (("block_sparse_moe", ("w1", "w3", "w2")) if moe_layout == "mixtral" else
                           ("mlp", ("gate_proj", "up_proj", "down_proj")))

    def expert(w: str, hf_shape) -> _Source:
      return _Source(lambda l, e: f"model.layers.{l}.{block}.experts.{e}.{w}.weight", (L, E), hf_shape, T)
    layers["moe"] = {"router": {"kernel": layer(f"{block}.gate.weight", (E, D), T)},
                     "experts": {"gate": expert(w1, (F, D)), "up": expert(w3, (F, D)), "down": expert(w2, (D, F))}}
  else:  # transformers 5's in-memory MoE classes: gate_up_proj [E, 2F, D], down_proj [E, D, F]
    gate_up = lambda off: _Source(lambda l: f"model.layers.{l}.mlp.experts.gate_up_proj", (L,), (E, 2 * F, D),
                                  (0, 2, 1), (0, off, 0), (E, F, D))
    layers["moe"] = {"router": {"kernel": layer("mlp.gate.weight", (E, D), T)},
                     "experts": {"gate": gate_up(0), "up": gate_up(F),
                                 "down": layer("mlp.experts.down_proj", (E, D, F), (0, 2, 1))}}
  tree: Params = {"embed": {"embedding": _Source(lambda: "model.embed_tokens.weight", (), (V, D), (0, 1))},
                  "layers": layers, "final_norm": {"scale": _Source(lambda: "model.norm.weight", (), (D,), I)}}
  if not cfg.tie_embeddings:
    tree["lm_head"] = {"kernel": _Source(lambda: "lm_head.weight", (), (V, D), T)}
  return tree


def _is_source(x) -> bool:
  return isinstance(x, _Source)


def _names(src: _Source) -> list[str]:
  return [src.name(*idx) for idx in np.ndindex(*src.lead)] if src.lead else [src.name()]


# ----------------------------------------------------------------------------------------------------------------
# Import.

def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise BarError(f"{path} is unreadable ({e}); re-download or re-export the model directory") from None


@dataclasses.dataclass(frozen=True)
class Family:
  """One Hugging Face causal-LM class: the ModelConfig attention/norm fields it implies, and its MoE class."""
  model_type: str
  arch: dict[str, Any]              # qkv_bias / qk_norm / norm_position (the rest at their defaults)
  moe: bool = False
  moe_class: str = ""               # dense families: the class a branch or a merged MoE exports to


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", {}, moe_class="MixtralForCausalLM"),
    "Qwen2ForCausalLM": Family("qwen2", {"qkv_bias": True}, moe_class="Qwen2MoeForCausalLM"),
    "Qwen3ForCausalLM": Family("qwen3", {"qk_norm": "head"}, moe_class="Qwen3MoeForCausalLM"),
    "Olmo2ForCausalLM": Family("olmo2", {"qk_norm": "proj", "norm_position": "post"},
                               moe_class="FlexOlmoForCausalLM"),
    "MixtralForCausalLM": Family("mixtral", {}, moe=True),
    "Qwen2MoeForCausalLM": Family("qwen2_moe", {"qkv_bias": True}, moe=True),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", {"qk_norm": "head"}, moe=True),
    "FlexOlmoForCausalLM": Family("flex_olmo", {"qk_norm": "proj", "norm_position": "post"}, moe=True),
}
_ARCH_FIELDS = ("qkv_bias", "qk_norm", "norm_position")
_ARCH_DEFAULTS = {"qkv_bias": False, "qk_norm": "none", "norm_position": "pre"}
SUPPORTED = ", ".join(FAMILIES)


def _family_of(hf: dict[str, Any]) -> tuple[str | None, Family | None]:
  arch = (hf.get("architectures") or [None])[0]
  if arch is None:  # a config.json without architectures: go by model_type
    arch = next((a for a, f in FAMILIES.items() if f.model_type == hf.get("model_type")), None)
  return arch, FAMILIES.get(arch)


def _rope_fields(hf: dict[str, Any], problems: list[str]) -> dict[str, Any]:
  """rope_parameters (transformers 5) or rope_scaling + rope_theta (older configs) -> ModelConfig RoPE fields."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type")) or "default"
  out: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
  if rope_type == "llama3":
    out.update(rope_type="llama3", rope_factor=float(rope["factor"]),
               rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
               rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
               rope_original_max_len=int(rope.get("original_max_position_embeddings", 8192)))
  elif rope_type != "default":
    problems.append(f"rope_type={rope_type!r} (supported: 'default', 'llama3')")
  return out


def config_from_hf(hf: dict[str, Any], path: str = CONFIG_FILE) -> ModelConfig:
  """A config.json dict of a supported family -> ModelConfig (BarError for anything these weights cannot express)."""
  arch, fam = _family_of(hf)
  if fam is None:
    raise BarError(f"{path}: architecture {arch or hf.get('model_type')!r} is not supported; "
                   f"import one of {SUPPORTED}")
  problems = []
  kw = _rope_fields(hf, problems)
  if hf.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={hf['hidden_act']!r} (only silu)")
  if hf.get("mlp_bias"):
    problems.append("mlp_bias (no FFN biases)")
  if fam.model_type not in ("qwen2", "qwen2_moe") and hf.get("attention_bias"):
    problems.append("attention_bias (q/k/v/o biases: only Qwen 2's q/k/v biases)")
  window = hf.get("sliding_window")
  sliding = hf.get("use_sliding_window", window not in (None, 0))
  if (sliding and window not in (None, 0) and window < hf.get("max_position_embeddings", 0)) or (
      "sliding_attention" in (hf.get("layer_types") or [])):
    problems.append(f"sliding_window={window} (full attention only)")
  if fam.model_type in ("qwen2_moe", "qwen3_moe") and (hf.get("decoder_sparse_step", 1) != 1 or
                                                        hf.get("mlp_only_layers")):
    problems.append("dense layers among the MoE layers (decoder_sparse_step/mlp_only_layers: every layer an MoE)")
  if problems:
    raise BarError(f"{path}: unsupported {', '.join(problems)}; export the model without them")
  heads = hf["num_attention_heads"]
  moe_width = hf.get("moe_intermediate_size") if fam.model_type in ("qwen2_moe", "qwen3_moe") else None
  kw.update(fam.arch)
  if fam.model_type == "qwen2_moe":  # the one MoE class whose q/k/v biases are a switch
    kw["qkv_bias"] = bool(hf.get("qkv_bias", True))
  kw.update(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, d_ff=moe_width or hf["intermediate_size"],
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_style="half",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=int(hf.get("max_position_embeddings", 8192)))
  if fam.moe:
    E = hf.get("num_local_experts") or hf.get("num_experts")
    k = hf.get("num_experts_per_tok", 2)
    # Mixtral always renormalises the top-k (see the module docstring); the others say so in norm_topk_prob.
    norm = k < E if fam.model_type == "mixtral" else bool(hf.get("norm_topk_prob", False))
    kw.update(ffn="moe", n_experts=E, expert_kind="ffn", top_k=k, norm_topk=norm)
  try:
    return ModelConfig(**kw).validate()
  except ValueError as e:
    raise BarError(f"{path}: {e}") from None


class _Checkpoint:
  """The safetensors files of one directory: tensor name -> file, opened lazily (numpy; bfloat16 via flax)."""

  def __init__(self, path: str):
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
      weight_map = _read_json(index).get("weight_map", {})
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.safetensors")))
      weight_map = None
    if not files:
      hint = " (found PyTorch .bin weights: re-save them with save_pretrained(safe_serialization=True))" if glob.glob(
          os.path.join(path, "*.bin")) else ""
      raise BarError(f"{path}: no *.safetensors weights{hint}; point at a Hugging Face model directory")
    self.file_of: dict[str, str] = {}
    self._handles: dict[tuple[str, str], Any] = {}
    self.path = path
    for fname in files:
      handle = self._open(fname, "numpy")
      for name in handle.keys():
        self.file_of[name] = fname
    if weight_map is not None:
      missing = sorted(set(weight_map) - set(self.file_of))
      if missing:
        raise BarError(f"{index} lists {missing[0]} in {weight_map[missing[0]]}, which lacks it; "
                       "re-download the shards")

  def _open(self, fname: str, framework: str):
    key = (fname, framework)
    if key not in self._handles:
      from safetensors import safe_open
      full = os.path.join(self.path, fname)
      if not os.path.isfile(full):
        raise BarError(f"{full} is missing; re-download it (the index names it)")
      try:
        self._handles[key] = safe_open(full, framework=framework)
      except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise BarError(f"{full} is not a readable safetensors file ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); re-download or re-export it") from None
    return self._handles[key]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._open(self.file_of[name], "numpy").get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    fname = self.file_of[name]
    sl = self._open(fname, "numpy").get_slice(name)
    try:
      if sl.get_dtype() == "BF16":  # numpy has no bfloat16: read this slice through flax, then widen
        return np.asarray(self._open(fname, "flax").get_slice(name)[index], np.float32)
      return np.asarray(sl[index])
    except Exception as e:
      raise BarError(f"{os.path.join(self.path, fname)}: reading {name} failed ({type(e).__name__}: {e}); "
                     "re-download or re-export it") from None


def _read_block(ckpt: _Checkpoint, src: _Source, index: tuple[slice, ...] | None, dtype) -> np.ndarray:
  """The block `index` (slices over src.shape, as make_array_from_callback passes them) of one stacked leaf."""
  shape = src.shape
  index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
  ranges = [range(*s.indices(n)) for s, n in zip(index, shape)]
  nlead = len(src.lead)
  hf_index = [slice(o, o + n) for o, n in zip(src.offset or (0,) * len(src.hf_shape), src.region)]
  for j, a in enumerate(src.perm):  # our trailing axis j reads HF axis a
    r, start = ranges[nlead + j], hf_index[a].start
    hf_index[a] = slice(start + r.start, start + r.stop)
  out = np.empty([len(r) for r in ranges], dtype)
  for pos, idx in enumerate(np.ndindex(*[len(r) for r in ranges[:nlead]])):
    lead = tuple(ranges[i][k] for i, k in enumerate(idx))
    block = ckpt.read(src.name(*lead), tuple(hf_index))
    out[idx] = np.transpose(block, src.perm)
  return out


def load_dir(path: str, *, shardings=None, dtype=np.float32):
  """A Hugging Face directory of a supported family (FAMILIES) -> (ModelConfig, params, Tokenizer or None).

  shardings: None (default device), one `jax.sharding.Sharding` for every leaf, a tree of shardings shaped like the
  params, or a function ModelConfig -> either of those (the config is only known once config.json is read).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise BarError(f"{path} is not a directory; point at a Hugging Face model directory")
  cfg_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise BarError(f"{cfg_path} is missing; a Hugging Face model directory needs its config.json")
  hf = _read_json(cfg_path)
  cfg = config_from_hf(hf, cfg_path)
  ckpt = _Checkpoint(path)
  if "lm_head.weight" not in ckpt.file_of and not cfg.tie_embeddings:
    cfg = cfg.replace(tie_embeddings=True)  # no separate head stored: the embeddings are the head
  layout = ("fused" if "model.layers.0.mlp.experts.gate_up_proj" in ckpt.file_of else
            "mixtral" if "model.layers.0.block_sparse_moe.gate.weight" in ckpt.file_of else "per_expert")
  sources = _sources(cfg, layout)
  allowed_zero = _check_zero_shared_expert(ckpt, hf, path)

  used = set()
  for src in jax.tree.leaves(sources, is_leaf=_is_source):
    for name in _names(src):
      if name not in ckpt.file_of:
        raise BarError(f"{path}: tensor {name} is missing from the safetensors files; "
                       f"the weights do not match {CONFIG_FILE} (re-export the directory)")
      if ckpt.shape(name) != src.hf_shape:
        raise BarError(f"{os.path.join(path, ckpt.file_of[name])}: {name} has shape {list(ckpt.shape(name))}, "
                       f"{CONFIG_FILE} implies {list(src.hf_shape)}; re-export the directory")
      used.add(name)
  unused = sorted(n for n in set(ckpt.file_of) - used - allowed_zero
                  if not n.endswith(_IGNORED_SUFFIXES) and not (n == "lm_head.weight" and cfg.tie_embeddings))
  if unused:
    raise BarError(f"{path}: tensor {unused[0]} (and {len(unused) - 1} more) has no place in a plain "
                   f"{hf.get('architectures', ['?'])[0]}; this variant is not supported")

  if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
    shardings = shardings(cfg)
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, sources, is_leaf=_is_source)

  def place(src: _Source, sharding):
    if sharding is None:
      return jax.device_put(_read_block(ckpt, src, None, dtype))
    return jax.make_array_from_callback(src.shape, sharding, lambda idx: _read_block(ckpt, src, idx, dtype))

  params = jax.tree.map(place, sources, shardings, is_leaf=_is_source)
  return cfg, params, _load_tokenizer(path)


def _check_zero_shared_expert(ckpt: _Checkpoint, hf: dict[str, Any], path: str) -> set[str]:
  """A Qwen2-MoE's shared-expert tensors, after checking they contribute exactly zero (what save_dir writes)."""
  names = {n for n in ckpt.file_of if ".mlp.shared_expert" in n}
  if not names:
    return names
  # The shared expert's output is sigmoid(gate) * down(...): zero for every input iff its down projection is zero.
  for n in sorted(names):
    if n.endswith("shared_expert.down_proj.weight"):
      w = ckpt.read(n, (slice(None),) * len(ckpt.shape(n)))
      if np.any(w != 0):
        raise BarError(f"{path}: {n} is not zero: this Qwen2-MoE has a shared expert, which bar_jax's MoE lacks; "
                       f"import one of {SUPPORTED} without a shared expert")
  return names


def _load_tokenizer(path: str):
  """bar_jax's Tokenizer from tokenizer.json (+ tokenizer_chat.json, or the chat template of tokenizer_config.json)."""
  if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
    return None
  from bar_jax.data import tokenizer as tokenizer_lib
  if os.path.isfile(os.path.join(path, tokenizer_lib.CHAT_FILE)):
    return tokenizer_lib.Tokenizer.load(path)
  import tokenizers
  tok = tokenizers.Tokenizer.from_file(os.path.join(path, TOKENIZER_FILE))
  tc_path = os.path.join(path, TOKENIZER_CONFIG_FILE)
  tc = _read_json(tc_path) if os.path.isfile(tc_path) else {}
  template = tc.get("chat_template") or ""
  if isinstance(template, list):  # several named templates: the default one is the chat template
    template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")

  def token(key):
    t = tc.get(key)
    return t.get("content") if isinstance(t, dict) else t

  try:
    if template:  # the model's own template (Llama 3, Qwen, OLMo 2, SmolLM2's ChatML alike)
      return tokenizer_lib.Tokenizer.from_hf_template(tok, template, token("bos_token"), token("eos_token"),
                                                      token("pad_token"))
    eos, pad = (None if token(k) is None else tok.token_to_id(token(k)) for k in ("eos_token", "pad_token"))
    chat = {"format": "chatml", "default_system": None, "chat_template": "", "eos_token_id": eos,
            "pad_token_id": eos if pad is None else pad}
    return tokenizer_lib.Tokenizer(tok, chat)
  except BarError as e:
    raise BarError(f"{os.path.join(path, TOKENIZER_FILE)}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Export.

def export_class(cfg: ModelConfig) -> str:
  """The transformers class whose forward reproduces this config's logits (BarError where none does)."""
  arch = {f: getattr(cfg, f) for f in _ARCH_FIELDS}
  dense = next((a for a, f in FAMILIES.items() if not f.moe and {**_ARCH_DEFAULTS, **f.arch} == arch), None)
  if dense is None:
    have = ", ".join(f"{k}={v!r}" for k, v in arch.items())
    raise BarError(f"no Hugging Face class has {have}; exportable: Llama (defaults), Qwen2 (qkv_bias=True), "
                   "Qwen3 (qk_norm='head'), OLMo 2 (qk_norm='proj', norm_position='post')")
  if cfg.ffn == "dense":
    return dense
  moe_class = FAMILIES[dense].moe_class
  k, E = cfg.k, cfg.n_experts
  if moe_class == "MixtralForCausalLM" and k < E and not cfg.norm_topk:
    raise BarError(f"top_k={k} of {E} experts with norm_topk=False has no Hugging Face equivalent for a Llama base "
                   "(Mixtral renormalises the top-k weights); export with norm_topk=True or top_k=0 (all experts)")
  return moe_class


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """ModelConfig -> the config.json dict of `export_class(cfg)` (BarError where HF cannot match)."""
  if cfg.rope_style != "half":
    raise BarError(f"rope_style={cfg.rope_style!r}: Hugging Face models use half-split RoPE; "
                   "re-import the base model with rope_style='half' before exporting")
  cls = export_class(cfg)
  rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type == "llama3":
    rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_max_len)
  hf: dict[str, Any] = {
      "architectures": [cls], "model_type": FAMILIES[cls].model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.rms_eps, "rope_parameters": rope,
      "rope_theta": cfg.rope_theta,  # for readers older than transformers 5
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
      "initializer_range": 0.02, "use_cache": True, "dtype": "float32", "torch_dtype": "float32",
      # Some classes default these to their released tokenizer's ids; the tokenizer (if any) sets them below.
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
  }
  if cfg.rope_type == "llama3":
    hf["rope_scaling"] = dict(rope)  # for readers older than transformers 5
  if cls in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  if cls == "LlamaForCausalLM":
    hf.update(mlp_bias=False)
  if cfg.ffn == "dense":
    return hf
  k, E = cfg.k, cfg.n_experts
  if cls == "MixtralForCausalLM":
    hf.update(num_local_experts=E, num_experts_per_tok=k, sliding_window=None, router_jitter_noise=0.0,
              output_router_logits=False, router_aux_loss_coef=0.0)
    return hf
  hf.update(num_experts=E, num_experts_per_tok=k, norm_topk_prob=cfg.norm_topk, output_router_logits=False,
            router_aux_loss_coef=0.0)
  if cls in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
    hf.update(moe_intermediate_size=cfg.d_ff, decoder_sparse_step=1, mlp_only_layers=[])
  if cls == "Qwen2MoeForCausalLM":  # qkv biases on; the shared expert is written as zeros (module docstring)
    hf.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=1)
  return hf


def _zero_shared_expert(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """A width-1 Qwen2-MoE shared expert with all-zero weights (its output, sigmoid(0) * 0, is exactly zero)."""
  D, out = cfg.d_model, {}
  for l in range(cfg.n_layers):
    p = f"model.layers.{l}.mlp.shared_expert"
    out.update({f"{p}.gate_proj.weight": np.zeros((1, D), np.float32),
                f"{p}.up_proj.weight": np.zeros((1, D), np.float32),
                f"{p}.down_proj.weight": np.zeros((D, 1), np.float32),
                f"{p}_gate.weight": np.zeros((1, D), np.float32)})
  return out


def _host_tree(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
  """Params with LoRA experts materialised (anchor + delta): the stacked (E, D, F) ffn layout Mixtral stores."""
  if cfg.ffn != "moe" or cfg.expert_kind != "lora":
    return cfg, params
  gate, up, down = jax.vmap(lambda lp: moe.expert_weights(lp, cfg))(params["layers"]["moe"])
  layers = dict(params["layers"])
  layers["moe"] = {"router": params["layers"]["moe"]["router"], "experts": {"gate": gate, "up": up, "down": down}}
  return cfg.replace(expert_kind="ffn"), {**params, "layers": layers}


def _check_shapes(cfg: ModelConfig, params: Params) -> None:
  want = transformer.param_shapes(cfg)
  is_shape = lambda s: isinstance(s, tuple)
  w_paths = {jax.tree_util.keystr(p): s for p, s in jax.tree.flatten_with_path(want, is_leaf=is_shape)[0]}
  g_paths = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree.flatten_with_path(params)[0]}
  if w_paths != g_paths:
    bad = sorted(set(w_paths.items()) ^ set(g_paths.items()))[0]
    raise BarError(f"params do not match the model config at {bad[0]} ({bad[1]}); export the config these params "
                   "were trained with")


def save_dir(path: str, cfg: ModelConfig, params: Params, tokenizer=None, *, provenance: dict | None = None,
             max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
  """Write a Hugging Face model directory (config.json, safetensors, tokenizer files); returns path.

  Written to a temporary sibling and renamed into place, so a killed export leaves nothing at `path`; an existing
  `path` is never overwritten (an empty directory is replaced). Weights are stored in float32, bit-identical to the
  params. `provenance` (e.g. the source artifact's name and fingerprint) goes to bar_jax_export.json beside them.
  """
  from safetensors.numpy import save_file
  path = os.fspath(path)
  if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
    raise BarError(f"{path} already exists; choose a new output directory or remove the old export")
  hf_config = config_to_hf(cfg)
  _check_shapes(cfg, params)
  cfg, params = _host_tree(cfg, params)

  # Plan: one (HF name, leaf, lead index, perm) per tensor; shard by size before any array leaves the devices.
  cls = hf_config["architectures"][0]
  sources = _sources(cfg, "mixtral" if cls == "MixtralForCausalLM" else "per_expert")
  plan = []
  for src, leaf in zip(jax.tree.leaves(sources, is_leaf=_is_source),
                       jax.tree.leaves(jax.tree.map(lambda s, x: x, sources, params, is_leaf=_is_source))):
    for idx in (np.ndindex(*src.lead) if src.lead else [()]):
      plan.append((src.name(*idx), leaf, idx, src))
  if cls == "Qwen2MoeForCausalLM":
    for name, zeros in _zero_shared_expert(cfg).items():
      plan.append((name, zeros, (), _Source(lambda: name, (), zeros.shape, tuple(range(zeros.ndim)))))
  plan.sort(key=lambda t: t[0])
  shards, size = [[]], 0
  for item in plan:
    nbytes = int(np.prod(item[3].hf_shape)) * 4
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes

  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    names = [WEIGHTS_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
      tensors = {}
      for name, leaf, idx, src in shard:
        block = np.asarray(jax.device_get(leaf[idx] if idx else leaf), np.float32)
        # Our trailing axes are the HF axes in `perm` order; invert it to get the stored layout back.
        tensors[name] = np.ascontiguousarray(np.transpose(block, np.argsort(src.perm)))
        weight_map[name] = fname
        total += tensors[name].nbytes
      save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
      del tensors
    if len(shards) > 1:
      with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
      _save_tokenizer(tmp, tokenizer, hf_config)
    if provenance is not None:
      with open(os.path.join(tmp, PROVENANCE_FILE), "w") as f:
        json.dump(provenance, f, indent=1, sort_keys=True)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    os.rename(tmp, path)  # atomic; also replaces an empty directory
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def _save_tokenizer(directory: str, tokenizer, hf_config: dict[str, Any]) -> None:
  """tokenizer.json (+ bar_jax's tokenizer_chat.json) and the tokenizer_config.json transformers reads."""
  import tokenizers
  if isinstance(tokenizer, tokenizers.Tokenizer):
    tokenizer.save(os.path.join(directory, TOKENIZER_FILE))
    return
  tokenizer.save(directory)
  tok, chat = tokenizer.tok, tokenizer.chat
  eos = chat.get("eos_token_id")
  pad = chat.get("pad_token_id")
  tc = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat.get("chat_template") or None,
        "bos_token": chat.get("bos_token"),
        "eos_token": None if eos is None else tok.id_to_token(eos),
        "pad_token": None if pad is None else tok.id_to_token(pad),
        "model_max_length": hf_config["max_position_embeddings"], "clean_up_tokenization_spaces": False}
  with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w") as f:
    json.dump(tc, f, indent=2)
  hf_config.update(eos_token_id=eos, pad_token_id=pad)
