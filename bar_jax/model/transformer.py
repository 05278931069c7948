"""Llama-family decoder as pure functions of a nested parameter dict (its layout: `param_shapes`).

RMSNorm, RoPE (half-split or interleaved pairing; plain or Llama 3 scaled frequencies), grouped-query attention with
optional q/k/v biases (Qwen 2) and QK RMSNorm per head (Qwen 3) or over the whole projection (OLMo 2), SwiGLU FFN (or
an MoE block in the same slot), sub-layer norms before (Llama, Qwen) or after (OLMo 2) each sub-layer, tied or untied
LM head. The family is data: every variation is a ModelConfig field, so one code path serves all of them. Layers are
stacked on a leading axis and run under `jax.lax.scan`, so a 30-layer model compiles like a 1-layer one. Everything
here is arrays in, arrays out: no files, no globals. The architecture comes from `ModelConfig`; how to compute it
(dtype, remat, attention kernel, MoE dispatch) from `Compute`.

Norm leaves keep one name whatever their position: `attn_norm` is the attention sub-layer's norm (on its input when
norm_position="pre", on its output when "post"), `mlp_norm` the FFN sub-layer's.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from bar_jax import sharding
from bar_jax.model import attention, moe
from bar_jax.model.config import Compute, ModelConfig

Params = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# Parameters: initialisation and logical axes (one tree of names per leaf; sharding.py maps them to mesh axes).

def param_shapes(cfg: ModelConfig) -> Params:
  L, D, F, V = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
  qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  layers: Params = {
      "attn_norm": {"scale": (L, D)},
      "attn": {"q": {"kernel": (L, D, qd)}, "k": {"kernel": (L, D, kvd)}, "v": {"kernel": (L, D, kvd)},
               "o": {"kernel": (L, qd, D)}},
      "mlp_norm": {"scale": (L, D)},
  }
  attn = layers["attn"]
  if cfg.qkv_bias:
    for name, width in (("q", qd), ("k", kvd), ("v", kvd)):
      attn[name]["bias"] = (L, width)
  if cfg.qk_norm != "none":
    per_head = cfg.qk_norm == "head"
    attn["q_norm"] = {"scale": (L, cfg.head_dim if per_head else qd)}
    attn["k_norm"] = {"scale": (L, cfg.head_dim if per_head else kvd)}
  if cfg.ffn == "dense":
    layers["mlp"] = {"gate": {"kernel": (L, D, F)}, "up": {"kernel": (L, D, F)}, "down": {"kernel": (L, F, D)}}
  else:
    layers["moe"] = moe.param_shapes(cfg)
  tree: Params = {"embed": {"embedding": (V, D)}, "layers": layers, "final_norm": {"scale": (D,)}}
  if not cfg.tie_embeddings:
    tree["lm_head"] = {"kernel": (D, V)}
  return tree


def logical_axes(cfg: ModelConfig) -> Params:
  """Same tree as the parameters; each leaf a tuple of logical axis names (sharding.RULES maps them to mesh axes)."""
  layers: Params = {
      "attn_norm": {"scale": ("layers", "norm")},
      "attn": {"q": {"kernel": ("layers", "embed", "heads")}, "k": {"kernel": ("layers", "embed", "kv")},
               "v": {"kernel": ("layers", "embed", "kv")}, "o": {"kernel": ("layers", "heads", "embed")}},
      "mlp_norm": {"scale": ("layers", "norm")},
  }
  attn = layers["attn"]
  if cfg.qkv_bias:
    for name, axis in (("q", "heads"), ("k", "kv"), ("v", "kv")):
      attn[name]["bias"] = ("layers", axis)
  if cfg.qk_norm != "none":  # a norm scale is tiny: replicated, like the other norms
    attn["q_norm"] = {"scale": ("layers", "norm")}
    attn["k_norm"] = {"scale": ("layers", "norm")}
  if cfg.ffn == "dense":
    layers["mlp"] = {"gate": {"kernel": ("layers", "embed", "mlp")}, "up": {"kernel": ("layers", "embed", "mlp")},
                     "down": {"kernel": ("layers", "mlp", "embed")}}
  else:
    layers["moe"] = moe.logical_axes(cfg)
  tree: Params = {"embed": {"embedding": ("vocab", "embed")}, "layers": layers, "final_norm": {"scale": ("norm",)}}
  if not cfg.tie_embeddings:
    tree["lm_head"] = {"kernel": ("embed", "vocab")}
  return tree


def param_shardings(cfg: ModelConfig, mesh, params: Params | None = None) -> Params:
  """NamedSharding per parameter on mesh (shapes from cfg, or from `params` when given)."""
  return sharding.tree_shardings(logical_axes(cfg), params if params is not None else param_shapes(cfg), mesh)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Random initialisation (unit tests and speed benchmarks; real runs import a checkpoint)."""
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  with_paths, _ = jax.tree.flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
  paths = [jax.tree_util.keystr(p) for p, _ in with_paths]
  keys = jax.random.split(key, len(leaves))
  out = []
  for path, shape, k in zip(paths, leaves, keys):
    if "scale" in path:
      out.append(jnp.ones(shape, jnp.float32))
    elif path.endswith("['bias']"):
      out.append(jnp.zeros(shape, jnp.float32))
    elif "lora" in path and path.endswith("['b']"):
      out.append(jnp.zeros(shape, jnp.float32))  # B = 0: a fresh adapter is the identity
    else:
      fan_in = shape[-2] if len(shape) >= 2 else shape[-1]
      if "embedding" in path:
        fan_in = shape[-1]
      out.append(jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan_in))
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks.

def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """The hd/2 RoPE inverse frequencies (float32, as Hugging Face computes them), with Llama 3's scaling when
  cfg.rope_type == "llama3".

  Llama 3 keeps short wavelengths (< original_len / high_freq_factor), divides long ones (> original_len /
  low_freq_factor) by the factor, and interpolates linearly in original_len / wavelength between the two.
  """
  hd = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  if cfg.rope_type == "llama3":
    wavelen = 2 * math.pi / inv_freq
    ramp = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    ramp = jnp.clip(ramp, 0.0, 1.0)  # 0 on long wavelengths (fully scaled), 1 on short ones (untouched)
    inv_freq = (1 - ramp) * inv_freq / cfg.rope_factor + ramp * inv_freq
  return inv_freq


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, style: str) -> jax.Array:
  """x [B, T, H, hd]; positions [B, T]; inv_freq [hd/2]. 'half' rotates (i, i + hd/2) pairs, 'interleaved'
  rotates (2i, 2i+1)."""
  hd = x.shape[-1]
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  if style == "half":
    x1, x2 = xf[..., : hd // 2], xf[..., hd // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  else:
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
  return out.astype(x.dtype)


@moe.keep_projections
def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  dt = x.dtype
  h = jax.nn.silu(moe.projection(x @ gate.astype(dt))) * moe.projection(x @ up.astype(dt))
  return h @ down.astype(dt)


attention_mask = attention.dense_mask


def attend(q, k, v, mask, compute: Compute):
  """Attention over a KV cache with an explicit mask (xla, or cuDNN when asked for by name)."""
  impl = "cudnn" if compute.attention == "cudnn" else None
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def _block(cfg: ModelConfig, compute: Compute, mesh, x, lp, positions, segment_ids, cache_kv, cache_index,
           kv_valid=None, ring: bool = False, capture: bool = False):
  """One decoder layer. cache_kv = (k [L,B,S,K,hd], v, layer): every layer's cache, of which this layer's slots
  cache_index.. are written and read; or None.

  kv_valid [B, S] marks cache slots that hold real tokens (left padding False); causality is by slot, or, for a
  ring cache (one new token per row), kv_valid alone says which slots a row attends.
  """
  B, T, _ = x.shape
  dt = x.dtype
  pre = cfg.norm_position == "pre"
  h = rms_norm(x, lp["attn_norm"]["scale"], cfg.rms_eps) if pre else x
  a = lp["attn"]

  def project(name: str, n_heads: int) -> jax.Array:
    y = h @ a[name]["kernel"].astype(dt)
    if cfg.qkv_bias:
      y = y + a[name]["bias"].astype(dt)
    norm = a.get(f"{name}_norm")
    if norm is not None and cfg.qk_norm == "proj":  # OLMo 2: over all heads at once, before the head split
      y = rms_norm(y, norm["scale"], cfg.rms_eps)
    y = y.reshape(B, T, n_heads, cfg.head_dim)
    if norm is not None and cfg.qk_norm == "head":  # Qwen 3: each head separately, one shared scale [hd]
      y = rms_norm(y, norm["scale"], cfg.rms_eps)
    return y

  q, k, v = project("q", cfg.n_heads), project("k", cfg.n_kv_heads), project("v", cfg.n_kv_heads)
  inv_freq = rope_frequencies(cfg)
  q = rope(q, positions, inv_freq, cfg.rope_style)
  k = rope(k, positions, inv_freq, cfg.rope_style)
  if cache_kv is None:  # training and scoring: packed rows, the kernel per backend (bar_jax/model/attention.py)
    new_cache = None
    o = attention.self_attention(q, k, v, positions, segment_ids, compute.attention, mesh)
  else:
    # The new keys go into the whole stacked cache in place (the scan carries it): scanning over the cache as a
    # per-layer input and output instead copied every layer's slice in and out each decode step (3x the step).
    ks, vs, layer = cache_kv
    at = (layer, 0, cache_index, 0, 0)
    ks = jax.lax.dynamic_update_slice(ks, k[None].astype(ks.dtype), at)
    vs = jax.lax.dynamic_update_slice(vs, v[None].astype(vs.dtype), at)
    ck = jax.lax.dynamic_index_in_dim(ks, layer, keepdims=False)
    cv = jax.lax.dynamic_index_in_dim(vs, layer, keepdims=False)
    S = ck.shape[1]
    if ring:
      mask = jnp.broadcast_to(kv_valid[:, None, None, :], (B, 1, T, S))
    else:
      slots = jnp.broadcast_to(jnp.arange(S)[None], (B, S))
      # Causal by slot (a left-padded row's RoPE positions lag its slots); unwritten and padding slots masked out.
      q_slots = jnp.broadcast_to(cache_index + jnp.arange(T)[None], (B, T))
      valid = slots < cache_index + T
      if kv_valid is not None:
        valid &= kv_valid
      mask = attention_mask(q_slots, slots, None, None, k_valid=valid)
    new_cache = (ks, vs)
    o = attend(q, ck.astype(dt), cv.astype(dt), mask, compute)
  o = o.reshape(B, T, cfg.n_heads * cfg.head_dim) @ a["o"]["kernel"].astype(dt)
  x = x + (o if pre else rms_norm(o, lp["attn_norm"]["scale"], cfg.rms_eps))
  h = rms_norm(x, lp["mlp_norm"]["scale"], cfg.rms_eps) if pre else x
  if cfg.ffn == "dense":
    m = lp["mlp"]
    y, aux = swiglu(h, m["gate"]["kernel"], m["up"]["kernel"], m["down"]["kernel"]), {}
  else:
    y, aux = moe.moe_ffn(lp["moe"], h, cfg, mesh=mesh, compute=compute)
    if capture:
      aux["router_input"] = h  # the router's (and every expert's) input, for `layerwise`
  if not pre:
    y = rms_norm(y, lp["mlp_norm"]["scale"], cfg.rms_eps)
  return x + y, aux, new_cache


_REMAT = {"full": jax.checkpoint_policies.nothing_saveable,
          "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, *, compute: Compute = Compute(),
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None, mesh=None,
            return_hidden: bool = False):
  """Full-sequence forward. tokens [B, T] -> (logits [B, T, V] float32, aux).

  aux holds per-layer MoE statistics stacked on a leading L axis (empty for a dense model). With
  return_hidden=True the final-norm hidden states are returned instead of logits (for chunked losses).
  """
  dt = jnp.dtype(compute.dtype)
  B, T = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
  x = params["embed"]["embedding"].astype(dt)[tokens]

  def body(x, lp):
    # Pinning the residual stream to batch sharding makes XLA all-gather each layer's FSDP-sharded weights (FSDP)
    # instead of all-gathering the activations over the batch (what it picks unconstrained: 8x the activations).
    x = sharding.constrain_batch(x, mesh)
    y, aux, _ = _block(cfg, compute, mesh, x, lp, positions, segment_ids, None, None)
    return sharding.constrain_batch(y, mesh), aux

  if compute.remat != "none":
    body = jax.checkpoint(body, policy=_REMAT[compute.remat], prevent_cse=False)
  # Kernels cast to the compute dtype once, while still sharded: FSDP then all-gathers bf16, not fp32 (half the bytes).
  layers = jax.tree.map(lambda w: w.astype(dt) if w.ndim >= 3 else w, params["layers"])
  if cfg.ffn == "moe":
    layers = dict(layers, moe=moe.unstack_experts(layers["moe"], cfg, compute, mesh))
  x, aux = jax.lax.scan(body, x, layers)
  x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_eps)
  if return_hidden:
    return x, aux
  return lm_logits(params, x, cfg), aux


@functools.partial(jax.jit, static_argnames=("cfg", "compute"))
def _layer(lp, x, positions, segment_ids, *, cfg: ModelConfig, compute: Compute):
  y, aux, _ = _block(cfg, compute, None, x, lp, positions, segment_ids, None, None, capture=True)
  return y, aux


def layerwise(params: Params, batches, cfg: ModelConfig, visit, *, compute: Compute = Compute()) -> Params:
  """Runs the decoder one layer at a time over `batches` (a list of {inputs, positions, segment_ids} [B, T]; no
  scan, one device) and calls visit(layer, [router input [B, T, D] per batch, as numpy], router kernel [D, E]) at
  each MoE layer BEFORE the layer's FFN runs. visit may return a new router kernel for that layer, which the layer
  then runs with, so later layers see the routing chosen here (a closed-form router fitted layer by layer in one
  pass). Returns params with the kernels visit returned. Calibration and diagnostics only: training and decoding
  use `forward` / `forward_cached`."""
  import numpy as np
  if cfg.ffn != "moe":
    raise ValueError("layerwise visits MoE layers: the model has no router")
  dt = jnp.dtype(compute.dtype)
  xs = [params["embed"]["embedding"].astype(dt)[jnp.asarray(b["inputs"])] for b in batches]
  pos = [jnp.asarray(b["positions"]) for b in batches]
  seg = [jnp.asarray(b["segment_ids"]) for b in batches]
  kernels = np.array(params["layers"]["moe"]["router"]["kernel"])
  for layer in range(cfg.n_layers):
    lp = jax.tree.map(lambda w: w[layer], params["layers"])
    outs = [_layer(lp, x, p, s, cfg=cfg, compute=compute) for x, p, s in zip(xs, pos, seg)]
    new = visit(layer, [np.asarray(aux["router_input"]) for _, aux in outs], kernels[layer])
    if new is not None:  # the layer runs again with the router chosen on its inputs
      kernels[layer] = np.asarray(new, kernels.dtype)
      lp = dict(lp, moe=dict(lp["moe"], router={"kernel": jnp.asarray(kernels[layer])}))
      outs = [_layer(lp, x, p, s, cfg=cfg, compute=compute) for x, p, s in zip(xs, pos, seg)]
    xs = [y for y, _ in outs]
  layers = dict(params["layers"], moe=dict(params["layers"]["moe"], router={"kernel": kernels}))
  return dict(params, layers=layers)


def lm_logits(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
  head = params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
  return (x @ head.astype(x.dtype)).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# KV-cache decoding.

def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype="float32") -> dict[str, jax.Array]:
  dtype = jnp.dtype(dtype)
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}


def forward_cached(params: Params, tokens: jax.Array, cache: dict[str, jax.Array], cfg: ModelConfig, *,
                   compute: Compute = Compute(), positions: jax.Array | None = None,
                   kv_valid: jax.Array | None = None, mesh=None, last_only: bool = False, ring: bool = False):
  """Runs tokens [B, T] at cache slots index..index+T; returns (logits [B, T, V], new cache); with last_only, the
  logits of the last position only ([B, 1, V]: a prefill's [B, T, V] logits can be tens of GB).

  positions default to the slot index (left-padded prompts pass their own so padding does not shift RoPE);
  kv_valid [B, S] (cache length S) masks padding slots out of attention. ring: the cache is a ring of S slots
  (continuous batching, model/generate.py): one token per row goes to slot index, and kv_valid, which then must
  include that slot, is the whole mask.
  """
  dt = jnp.dtype(compute.dtype)
  B, T = tokens.shape
  if ring and (T != 1 or kv_valid is None):
    raise ValueError("a ring cache takes one token per row and its kv_valid mask")
  index = cache["index"]
  if positions is None:
    positions = jnp.broadcast_to(index + jnp.arange(T)[None], (B, T))
  x = params["embed"]["embedding"].astype(dt)[tokens]

  def body(carry, lp):
    x, ks, vs, layer = carry
    y, _, (ks, vs) = _block(cfg, compute, mesh, x, lp, positions, None, (ks, vs, layer), index, kv_valid, ring)
    return (y, ks, vs, layer + 1), None

  (x, ks, vs, _), _ = jax.lax.scan(body, (x, cache["k"], cache["v"], jnp.int32(0)), params["layers"])
  if last_only:
    x = x[:, -1:]
  x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_eps)
  return lm_logits(params, x, cfg), {"k": ks, "v": vs, "index": index + T}


# ----------------------------------------------------------------------------------------------------------------
# Accounting.

def count_params(params: Params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def active_matmul_params(cfg: ModelConfig) -> int:
  """Parameters multiplied per token (embedding lookup excluded, LM head included)."""
  D, F, L = cfg.d_model, cfg.d_ff, cfg.n_layers
  attn = D * cfg.n_heads * cfg.head_dim * 2 + D * cfg.n_kv_heads * cfg.head_dim * 2
  ffn = 3 * D * F * (cfg.k if cfg.ffn == "moe" else 1)
  router = D * cfg.n_experts if cfg.ffn == "moe" else 0
  return L * (attn + ffn + router) + D * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token (forward + backward = 3x forward), attention scores included."""
  attn_scores = 2 * 2 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim / 2  # causal: half the square
  return 3 * (2 * active_matmul_params(cfg) + attn_scores)
