"""The MoE FFN block: router + stacked experts (expert 0 is the anchor) + dispatch.

Per-layer parameters (the scan slices off the leading L axis):
  router/kernel        [D, E]
  experts/{gate,up}    [E0, D, F] ; experts/down [E0, F, D]   E0 = E for ffn experts, 1 (the anchor) for lora
  lora/{gate,up,down}/{a,b}  [E-1, in, r] / [E-1, r, out]    lora experts only:
                             expert i = anchor + (a_i @ b_i) * alpha/r

Dispatch paths ("dense" reference; "dropless" and "expert_parallel" are added beside it) all consume
`expert_weights(...)`: LoRA experts are materialised as anchor + delta (cheap: E*D*F*r FLOPs), so every path runs
one stacked (E, D, F) expert layout.
"""
from __future__ import annotations

from typing import Any

import jax
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


def dense_dispatch(x: jax.Array, weights: jax.Array, gate, up, down) -> jax.Array:
  """Every expert on every token, combined by the (top-k masked) router weights. x [N, D]."""
  dt = x.dtype
  h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, gate.astype(dt))) * jnp.einsum("nd,edf->enf", x, up.astype(dt))
  y = jnp.einsum("enf,efd->end", h, down.astype(dt))
  return jnp.einsum("end,ne->nd", y, weights.astype(dt))


def moe_ffn(p: Params, x: jax.Array, cfg: ModelConfig, mesh=None,
            compute: Compute = Compute()) -> tuple[jax.Array, dict[str, jax.Array]]:
  """x [B, T, D] -> (y [B, T, D], aux {z_loss, lb_loss, expert_load [E], dropped})."""
  B, T, D = x.shape
  xt = x.reshape(B * T, D)
  weights, idx, logits = route(p["router"]["kernel"], xt, cfg)
  gate, up, down = expert_weights(p, cfg)
  if compute.dispatch == "dense":
    y, dropped = dense_dispatch(xt, weights, gate, up, down), jnp.zeros((), jnp.int32)
  else:
    from bar_jax.model import dispatch  # the grouped and expert-parallel paths
    y, dropped = dispatch.run(compute.dispatch, xt, weights, idx, gate, up, down, compute.capacity_factor, mesh)
  aux = router_losses(logits, weights, idx, cfg.n_experts)
  aux["dropped"] = dropped
  return y.reshape(B, T, D), aux
