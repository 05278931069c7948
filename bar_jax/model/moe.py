"""The MoE FFN block: router + stacked experts (expert 0 is the anchor) + dispatch.

Per-layer parameters (the scan slices off the leading L axis):
  router/kernel        [D, E]
  experts/{gate,up}    [E0, D, F] ; experts/down [E0, F, D]   E0 = E for ffn experts, 1 (the anchor) for lora
  lora/{gate,up,down}/{a,b}  [E-1, in, r] / [E-1, r, out]    lora experts only:
                             expert i = anchor + (a_i @ b_i) * alpha/r

How each layer runs (the output is always sum_e w_e * expert_e(x), w the top-k-masked router weights):
  lora experts   `lora_ffn`, whatever the dispatch: the anchor's gate/up run once for every token, each adapter adds
                 its low-rank term (x a) b, and the down projection runs once on the router-weighted hidden units
                 (plus each adapter's low-rank down term). The experts are never materialised.
  dense dispatch `dense_dispatch`: all experts as ONE wide FFN of width E*F whose hidden units are scaled by their
                 expert's router weight before the down projection (one matmul, no [E, N, D] intermediate).
  top_k = E      the same wide FFN for dropless too (nothing to skip), and for expert_parallel unless the experts
                 are split over an expert mesh axis (then the all_to_all path keeps them where they live).
  otherwise      `dispatch.run` (dropless grouped matmul, expert_parallel all_to_all).
`expert_weights` materialises the stacked (E, D, F) layout for export and as the tests' reference.
"""
from __future__ import annotations

from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from bar_jax.model.config import Compute, ModelConfig

Params = dict[str, Any]


def param_shapes(cfg: ModelConfig) -> Params:
  L, D, F, E, r = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.lora_rank
  e0 = 1 if cfg.expert_kind == "lora" else E
  tree: Params = {"router": {"kernel": (L, D, E)},
                  "experts": {"gate": (L, e0, D, F), "up": (L, e0, D, F), "down": (L, e0, F, D)}}
  if cfg.expert_kind == "lora":
    a = E - 1
    tree["lora"] = {"gate": {"a": (L, a, D, r), "b": (L, a, r, F)}, "up": {"a": (L, a, D, r), "b": (L, a, r, F)},
                    "down": {"a": (L, a, F, r), "b": (L, a, r, D)}}
  return tree


def logical_axes(cfg: ModelConfig) -> Params:
  tree: Params = {"router": {"kernel": ("layers", "embed", "exp_router")},
                  "experts": {"gate": ("layers", "exp", "embed", "mlp"), "up": ("layers", "exp", "embed", "mlp"),
                              "down": ("layers", "exp", "mlp", "embed")}}
  if cfg.expert_kind == "lora":
    tree["lora"] = {"gate": {"a": ("layers", "exp", "embed", "lora"), "b": ("layers", "exp", "lora", "mlp")},
                    "up": {"a": ("layers", "exp", "embed", "lora"), "b": ("layers", "exp", "lora", "mlp")},
                    "down": {"a": ("layers", "exp", "mlp", "lora"), "b": ("layers", "exp", "lora", "embed")}}
  return tree


def expert_weights(p: Params, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Stacked per-expert (gate [E,D,F], up [E,D,F], down [E,F,D]) for one layer, LoRA deltas applied."""
  g, u, d = p["experts"]["gate"], p["experts"]["up"], p["experts"]["down"]
  if cfg.expert_kind != "lora":
    return g, u, d
  scale = cfg.lora_alpha / cfg.lora_rank
  out = []
  for name, w in (("gate", g), ("up", u), ("down", d)):
    delta = jnp.einsum("eir,ero->eio", p["lora"][name]["a"], p["lora"][name]["b"]) * scale
    out.append(jnp.concatenate([w, w + delta], axis=0))  # anchor, then anchor + delta_i
  return tuple(out)


def route(router_kernel: jax.Array, x: jax.Array, cfg: ModelConfig):
  """x [N, D] -> (combine weights [N, E] with zeros off the top-k, top-k indices [N, k], router logits [N, E]).

  Softmax in float32 over all experts; top_k keeps the k largest; norm_topk renormalises them to sum to 1.
  """
  logits = x.astype(jnp.float32) @ router_kernel.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  k = cfg.k
  if k == cfg.n_experts:
    idx = jnp.broadcast_to(jnp.arange(k), probs.shape)
    weights = probs
  else:
    top, idx = jax.lax.top_k(probs, k)
    weights = jnp.sum(jax.nn.one_hot(idx, cfg.n_experts, dtype=probs.dtype) * top[..., None], axis=-2)
  if cfg.norm_topk:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, idx, logits


def router_losses(logits: jax.Array, weights: jax.Array, idx: jax.Array, n_experts: int) -> dict[str, jax.Array]:
  """z-loss (mean squared logsumexp) and the Switch load-balance loss E * sum_i f_i * P_i."""
  z = jax.nn.logsumexp(logits, axis=-1)
  probs = jax.nn.softmax(logits, axis=-1)
  assigned = jnp.sum(jax.nn.one_hot(idx, n_experts, dtype=jnp.float32), axis=-2)  # [N, E] 0/1
  f = jnp.mean(assigned, axis=0) / idx.shape[-1]
  p = jnp.mean(probs, axis=0)
  # expert_prob / expert_top1 (mean router probability, share of tokens whose top choice each expert is): routing
  # diagnostics (bar_jax/evals/routing.py).
  top1 = jnp.mean(jax.nn.one_hot(jnp.argmax(logits, axis=-1), n_experts, dtype=jnp.float32), axis=0)
  return {"z_loss": jnp.mean(z * z), "lb_loss": n_experts * jnp.sum(f * p), "expert_load": f, "expert_prob": p,
          "expert_top1": top1, "expert_weight": jnp.mean(weights.astype(jnp.float32), axis=0)}  # applied weights


# The FFNs' backward pass keeps only their input projections (x @ W_gate, x @ W_up: tagged PROJECTION) and recomputes
# the elementwise rest. Without this the layer scan stacks every intermediate of shape [N, F] (silu, its sigmoid,
# products, per-adapter terms: 11 of them for a LoRA branch layer) into zero-filled [L, N, F] buffers, written in the
# forward and read in the backward pass: memory traffic that cost more than recomputing them.
PROJECTION = "ffn_projection"


def keep_projections(fn):
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(PROJECTION), prevent_cse=False)


def projection(x: jax.Array) -> jax.Array:
  return checkpoint_name(x, PROJECTION)


@keep_projections
def dense_dispatch(x: jax.Array, weights: jax.Array, gate, up, down) -> jax.Array:
  """Every expert on every token, combined by the (top-k masked) router weights. x [N, D], weights [N, E].

  One wide FFN of width E*F: each expert's hidden units are scaled by its router weight, and the down projection
  contracts (expert, hidden) at once, as a sum of E blocks (no [E, N, D] expert outputs). gate/up/down are stacked
  [E, ...] arrays or sequences of per-expert [D, F] / [F, D] arrays (`unstack_experts`): with separate arrays, the
  weight gradient of each expert is its own matmul, so XLA drops a frozen expert's (the branch anchor's) entirely.
  """
  dt = x.dtype
  w = weights.astype(dt)
  y = None
  for e in range(len(gate)):
    h = jax.nn.silu(projection(x @ gate[e].astype(dt))) * projection(x @ up[e].astype(dt)) * w[:, e:e + 1]
    part = h @ down[e].astype(dt)
    y = part if y is None else y + part
  return y


def uses_wide_ffn(cfg: ModelConfig, compute: Compute = Compute(), mesh=None) -> bool:
  """Whether ffn experts run as the wide FFN (`dense_dispatch`) rather than through `dispatch.run`."""
  dispatch_kind = compute.dispatch
  if cfg.expert_kind != "ffn":
    return False
  expert_sharded = dispatch_kind == "expert_parallel" and mesh is not None and mesh.shape.get("expert", 1) > 1
  return dispatch_kind == "dense" or (cfg.k == cfg.n_experts and not expert_sharded)


def unstack_experts(moe_layers: Params, cfg: ModelConfig, compute: Compute = Compute(), mesh=None) -> Params:
  """The scanned MoE leaves with ffn experts [L, E, ...] as E separate [L, ...] arrays (taken before the layer scan).

  A partially frozen expert leaf is joined from its frozen and trainable slices (freeze.join); split here, outside the
  scan, each expert's gradient is a separate output of the scan, and the frozen one is dead code that XLA removes
  (the stacked layout would compute it inside the scan and throw it away after).
  """
  if not uses_wide_ffn(cfg, compute, mesh):
    return moe_layers
  # lax.split, not indexing: its transpose concatenates the per-expert gradients (indexing's pads and adds them),
  # and XLA folds slice(concatenate) where freeze.split takes the trainable experts back out.
  experts = {name: [jnp.squeeze(piece, 1) for piece in jax.lax.split(w, (1,) * w.shape[1], axis=1)]
             for name, w in moe_layers["experts"].items()}
  return dict(moe_layers, experts=experts)


@keep_projections
def lora_ffn(x: jax.Array, weights: jax.Array, anchor: Params, lora: Params, scale: float) -> jax.Array:
  """LoRA experts as a side path. x [N, D], weights [N, E]; anchor {gate,up,down} [1, ...]; lora {gate,up,down}
  {a [E-1, in, r], b [E-1, r, out]}. Expert i > 0 is the anchor plus scale * a_i @ b_i on each projection, so

    gate_i(x) = x Wg + scale (x a_i) b_i            (x Wg computed once for all experts)
    y = (sum_e w_e h_e) Wd + scale sum_{i>0} ((w_i h_i) a_i) b_i

  costs one anchor FFN plus rank-r terms, instead of E full experts.
  """
  dt = x.dtype
  cast = lambda w: w.astype(dt)  # noqa: E731
  # Adapter-major [E-1, N, ...] layout: every rank-r product is a batched matmul over the adapters with no transpose
  # of the [*, N, F] activations.
  lo = {name: (cast(ab["a"]), cast(ab["b"])) for name, ab in lora.items()}
  r = lo["gate"][0].shape[-1]
  xa = jnp.einsum("ni,air->anr", x, jnp.concatenate([lo["gate"][0], lo["up"][0]], axis=-1)) * scale
  g0 = projection(x @ cast(anchor["gate"][0]))
  u0 = projection(x @ cast(anchor["up"][0]))
  g = g0 + jnp.einsum("anr,arf->anf", xa[..., :r], lo["gate"][1])    # [E-1, N, F]
  u = u0 + jnp.einsum("anr,arf->anf", xa[..., r:], lo["up"][1])
  w = weights.astype(dt)
  h_adapters = jax.nn.silu(g) * u * w.T[1:, :, None]                # router-weighted hidden units of the adapters
  h = jax.nn.silu(g0) * u0 * w[:, :1] + jnp.sum(h_adapters, axis=0)
  hd = jnp.einsum("anf,afr->anr", h_adapters, lo["down"][0]) * scale
  return h @ cast(anchor["down"][0]) + jnp.einsum("anr,ard->nd", hd, lo["down"][1])


def moe_ffn(p: Params, x: jax.Array, cfg: ModelConfig, mesh=None,
            compute: Compute = Compute()) -> tuple[jax.Array, dict[str, jax.Array]]:
  """x [B, T, D] -> (y [B, T, D], aux {z_loss, lb_loss, expert_load [E], dropped})."""
  dispatch_kind = compute.dispatch
  B, T, D = x.shape
  xt = x.reshape(B * T, D)
  weights, idx, logits = route(p["router"]["kernel"], xt, cfg)
  dropped = jnp.zeros((), jnp.int32)
  if cfg.expert_kind == "lora":
    y = lora_ffn(xt, weights, p["experts"], p["lora"], cfg.lora_alpha / cfg.lora_rank)
  elif uses_wide_ffn(cfg, compute, mesh):
    e = p["experts"]
    y = dense_dispatch(xt, weights, e["gate"], e["up"], e["down"])
  else:
    from bar_jax.model import dispatch  # the grouped and expert-parallel paths
    gate, up, down = (p["experts"][name] for name in ("gate", "up", "down"))
    y, dropped = dispatch.run(dispatch_kind, xt, weights, idx, gate, up, down, compute.capacity_factor, mesh)
  aux = router_losses(logits, weights, idx, cfg.n_experts)
  aux["dropped"] = dropped
  return y.reshape(B, T, D), aux
