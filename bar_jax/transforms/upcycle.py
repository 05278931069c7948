"""Dense -> 2-expert branch: every FFN becomes an MoE of the frozen anchor (expert 0) and a domain expert (expert 1).

Router init (`router_init`):
  random  OLMo-core's router default (the recipe's upcycler keeps it): a normal of std 0.02 truncated at +-3 std.
  zeros   the softmax is exactly 50/50, so a fresh branch whose experts are equal computes 0.5 f(x) + 0.5 f(x) = f(x),
          the dense base's output bit for bit in the FFN.
Either way, while both experts are the same function the routing cannot change the output, so the router's gradient
from the LM loss is zero (up to float rounding) until expert 1 moves off the anchor; only a domain expert initialised
from another checkpoint (`expert_init`) gives the router a signal at step 0.

Expert kinds:
  ffn   experts [L, 2, D, F]: the anchor and a full copy (of the base, or of `expert_init`'s FFN: the paper's recipe
        initialises the domain expert from the pre-trained rather than the post-trained model).
  lora  experts [L, 1, D, F] hold only the anchor; expert 1 = anchor + (a @ b) * alpha / rank with a small random
        and b = 0, so a fresh branch is exactly the base.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from bar_jax.errors import BarError
from bar_jax.model.config import ModelConfig

Params = dict[str, Any]
ROUTER_INITS = ("random", "zeros")
ROUTER_INIT_STD = 0.02  # OLMo-core MoELinearRouter.reset_parameters: trunc_normal_(std=0.02, a=-3 std, b=3 std)


# Where the anchor of a branch comes from in its dense base: {branch leaf: (base leaf, expert axis, anchor index)}.
# Artifacts store a branch over its base without these slices (io.artifact.write's from_base).
ANCHOR_FROM_BASE = {f"layers/moe/experts/{w}": (f"layers/mlp/{w}/kernel", 1, 0) for w in ("gate", "up", "down")}


def initial_router(key_router: jax.Array, n_layers: int, d_model: int, router_init: str = "random",
                   router_scale: float = ROUTER_INIT_STD) -> jax.Array:
  """A branch's router kernel [L, D, 2] before training (key_router: upcycle's first split of its key)."""
  if router_init == "zeros":
    return jnp.zeros((n_layers, d_model, 2), jnp.float32)
  return jax.random.truncated_normal(key_router, -3.0, 3.0, (n_layers, d_model, 2), jnp.float32) * router_scale


def branch_router_init(n_layers: int, d_model: int, seed: int = 0) -> jax.Array:
  """The router kernel a branch made with key(seed) started from (what its columns' updates are measured against)."""
  return initial_router(jax.random.split(jax.random.key(seed))[0], n_layers, d_model)


def upcycle(dense_params: Mapping[str, Any], dense_cfg: ModelConfig, *, expert_kind: str = "ffn",
            lora_rank: int = 16, lora_alpha: float = 32.0, expert_init: Mapping[str, Any] | None = None,
            key: jax.Array | None = None, router_init: str | None = None, router_scale: float = ROUTER_INIT_STD
            ) -> tuple[Params, ModelConfig]:
  """Returns (branch_params, branch_cfg). dense_params is the parameter dict of a dense model; nothing is copied
  except the FFN stack; the shared leaves of the result are the input's own arrays.

  router_init: "random" (needs `key`) or "zeros"; None = "random" when a key is given, else "zeros"."""
  if dense_cfg.ffn != "dense" or "mlp" not in dense_params.get("layers", {}):
    raise BarError("upcycle needs a dense model (ffn='dense' with layers/mlp): this one is already an MoE")
  if expert_kind not in ("ffn", "lora"):
    raise BarError(f"unknown expert kind {expert_kind!r}: use 'ffn' or 'lora'")
  router_init = router_init or ("random" if key is not None else "zeros")
  if router_init not in ROUTER_INITS:
    raise BarError(f"unknown router init {router_init!r}: use one of {ROUTER_INITS}")
  if router_init == "random" and key is None:
    raise BarError("router_init='random' needs a PRNG key (pass key=jax.random.key(seed))")
  if expert_kind == "lora" and expert_init is not None:
    raise BarError("expert_init needs expert_kind='ffn': a LoRA expert starts as the anchor plus a zero delta")
  mlp = dense_params["layers"]["mlp"]
  anchor = {w: jnp.asarray(mlp[w]["kernel"]) for w in ("gate", "up", "down")}
  L, D, F = anchor["gate"].shape
  if (L, D, F) != (dense_cfg.n_layers, dense_cfg.d_model, dense_cfg.d_ff):
    raise BarError(f"dense params have FFN shape {(L, D, F)} but the config says "
                   f"{(dense_cfg.n_layers, dense_cfg.d_model, dense_cfg.d_ff)}: pass the config of these params")
  domain = anchor
  if expert_init is not None:
    init_mlp = expert_init["layers"]["mlp"]
    domain = {w: jnp.asarray(init_mlp[w]["kernel"]) for w in ("gate", "up", "down")}
    for w in domain:
      if domain[w].shape != anchor[w].shape:
        raise BarError(f"expert_init's mlp/{w} has shape {domain[w].shape}, the base's {anchor[w].shape}: "
                       "initialise the expert from a checkpoint of the same architecture")

  key_router, key_lora = jax.random.split(key if key is not None else jax.random.key(0))
  router = initial_router(key_router, L, D, router_init, router_scale)

  if expert_kind == "ffn":
    experts = {w: jnp.stack([anchor[w], domain[w]], axis=1) for w in anchor}
    moe_params: Params = {"router": {"kernel": router}, "experts": experts}
  else:
    experts = {w: anchor[w][:, None] for w in anchor}
    dims = {"gate": (D, F), "up": (D, F), "down": (F, D)}
    lora = {}
    for w, k in zip(dims, jax.random.split(key_lora, 3)):
      fan_in, fan_out = dims[w]
      # a ~ N(0, 1/fan_in) (the usual LoRA init), b = 0: the delta a @ b is exactly zero until b trains.
      lora[w] = {"a": jax.random.normal(k, (L, 1, fan_in, lora_rank), jnp.float32) / jnp.sqrt(fan_in),
                 "b": jnp.zeros((L, 1, lora_rank, fan_out), jnp.float32)}
    moe_params = {"router": {"kernel": router}, "experts": experts, "lora": lora}

  layers = {name: leaf for name, leaf in dense_params["layers"].items() if name != "mlp"}
  layers["moe"] = moe_params
  branch = {name: leaf for name, leaf in dense_params.items() if name != "layers"}
  branch["layers"] = layers
  cfg = dense_cfg.replace(ffn="moe", n_experts=2, expert_kind=expert_kind, lora_rank=lora_rank,
                          lora_alpha=lora_alpha, top_k=0, norm_topk=False).validate()
  return branch, cfg
