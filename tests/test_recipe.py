"""The recipe as the paper's scripts run it: base + N shared-weight average, OLMo-core's router init and z-loss
reduction, the final norm in the SFT set, and the router learning-rate multiplier."""
import functools

import jax
import jax.numpy as jnp
from configs.common import opt_defaults
import numpy as np
import pytest

from bar_jax import optim, pytree
from bar_jax.model import transformer
from bar_jax.model.config import tiny
from bar_jax.stages import loop
from bar_jax.transforms import freeze, merge as merge_lib
from bar_jax.transforms.upcycle import ROUTER_INIT_STD, upcycle

CFG = tiny()
ROUTER = "layers/moe/router/kernel"


@pytest.fixture(scope="module")
def base():
  return jax.tree.map(np.asarray, transformer.init_params(CFG, jax.random.key(0)))


def noisy_branch(base, seed):
  """A 2-expert branch whose every leaf (shared ones included) moved off the base by seeded noise."""
  branch, bcfg = upcycle(base, CFG, key=jax.random.key(seed))
  rng = np.random.default_rng(seed)
  flat = {p: (np.asarray(x) + 0.1 * rng.standard_normal(np.shape(x))).astype(np.float32)
          for p, x in pytree.flatten(branch).items()}
  return pytree.unflatten(flat), bcfg


def batch(cfg, seed=0, b=2, t=16, loss_share=0.25):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (b, t + 1))
  mask = np.zeros((b, t), np.float32)
  mask[:, : int(t * loss_share)] = 1  # a partial loss mask, as in SFT (prompt tokens carry no loss)
  return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
          "mask": jnp.asarray(mask), "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
          "segment_ids": jnp.ones((b, t), jnp.int32)}


# ----------------------------------------------------------------------------------------------------------------
# Merge: the shared weights are the mean of N + 1 trees (the base and the N branches).

def test_average_is_the_mean_of_base_and_branches(base):
  n = 3
  branches = [noisy_branch(base, s) for s in range(1, n + 1)]
  merged, mcfg = merge_lib.merge(base, [b for b, _ in branches], [c for _, c in branches], rule="average")
  got, flat_base = pytree.flatten(merged), pytree.flatten(base)
  flat_branches = [pytree.flatten(b) for b, _ in branches]
  shared = [p for p in flat_branches[0] if not p.startswith("layers/moe/")]
  assert shared and mcfg.n_experts == n + 1
  for p in shared:
    want = np.mean(np.stack([flat_base[p]] + [fb[p] for fb in flat_branches]).astype(np.float64), axis=0)
    # Both sides hold the float64 mean rounded once to float32: at most one float32 ulp apart (2^-23 ~ 1.2e-7).
    np.testing.assert_allclose(got[p], want.astype(np.float32), rtol=2.4e-7, atol=0, err_msg=p)
    branches_only = np.mean(np.stack([fb[p] for fb in flat_branches]).astype(np.float64), axis=0)
    assert np.abs(got[p] - branches_only).max() > 1e-3, p  # the base really enters (noise 0.1 / (N + 1))
  # Experts are stacked, not averaged with the base: slot i + 1 is branch i's domain expert, bit for bit.
  for i, fb in enumerate(flat_branches):
    np.testing.assert_array_equal(got["layers/moe/experts/gate"][:, i + 1], fb["layers/moe/experts/gate"][:, 1])


# ----------------------------------------------------------------------------------------------------------------
# Router init and its gradient at step 0.

def test_router_init_is_olmo_cores_truncated_normal(base):
  branch, _ = upcycle(base, CFG, key=jax.random.key(1))
  w = np.asarray(branch["layers"]["moe"]["router"]["kernel"])
  assert np.abs(w).max() <= 3 * ROUTER_INIT_STD + 1e-7
  # std of N(0, s^2) truncated at +-3s is 0.9865 s; with n = L*D*2 = 128 samples its estimate has a ~6% s.e.
  assert 0.75 * ROUTER_INIT_STD < w.std() < 1.2 * ROUTER_INIT_STD, w.std()
  zeros, _ = upcycle(base, CFG, key=jax.random.key(1), router_init="zeros")
  assert not np.any(np.asarray(zeros["layers"]["moe"]["router"]["kernel"]))


@functools.lru_cache
def _router_grad_fn(cfg):
  """One compiled gradient per config (the four calls below share it; op by op it took ~50 s on 8 CPU devices)."""
  loss_fn = loop.lm_loss(cfg, z_loss=0.0)  # the LM loss alone: the z-loss has a router gradient of its own
  return jax.jit(lambda p, b: jax.grad(lambda q: loss_fn(q, b)[0])(p)["layers"]["moe"]["router"]["kernel"])


def router_grad(params, cfg):
  return np.asarray(_router_grad_fn(cfg)(params, batch(cfg)))


def test_router_gradient_at_step_zero(base):
  other = jax.tree.map(np.asarray, transformer.init_params(CFG, jax.random.key(7)))  # "the pretrained model"
  key = jax.random.key(3)
  zeros_copy = router_grad(*upcycle(base, CFG, key=key, router_init="zeros"))
  random_copy = router_grad(*upcycle(base, CFG, key=key, router_init="random"))
  random_other = router_grad(*upcycle(base, CFG, key=key, router_init="random", expert_init=other))
  zeros_other = router_grad(*upcycle(base, CFG, key=key, router_init="zeros", expert_init=other))
  # Two identical experts: the output does not depend on the routing, so the softmax backward p * (g - p.g) is zero
  # in exact arithmetic for any router; in float32 only rounding is left (the per-expert einsums and p0 + p1 != 1),
  # ~1e-7 relative x a few summed terms.
  scale = np.abs(random_other).max()
  assert scale > 1e-4
  assert np.abs(zeros_copy).max() < 1e-5 * scale and np.abs(random_copy).max() < 1e-5 * scale
  # A domain expert from another checkpoint gives the router a gradient at step 0, whatever its init.
  assert np.abs(zeros_other).max() > 0.1 * scale


# ----------------------------------------------------------------------------------------------------------------
# Router z-loss: OLMo-core sums every layer's z-loss; each is sum over positions of lse^2 / the batch's loss tokens.

@pytest.mark.parametrize("n_layers,n_experts", [(2, 2), (3, 5)])
def test_z_loss_reduction_matches_olmo_core(n_layers, n_experts):
  cfg = tiny(n_layers=n_layers, ffn="moe", n_experts=n_experts)
  params = transformer.init_params(cfg, jax.random.key(0))
  flat = pytree.flatten(params)
  # Zero FFN-norm gains make every router input 0, so every logit is 0 and lse = log E at every position of every
  # layer, whatever the (random, non-zero) router kernels: a closed form for the reference.
  flat["layers/mlp_norm/scale"] = jnp.zeros_like(flat["layers/mlp_norm/scale"])
  assert float(jnp.abs(flat[ROUTER]).max()) > 0
  params = pytree.unflatten(flat)
  b = batch(cfg)
  _, metrics = jax.jit(loop.lm_loss(cfg, z_loss=1e-3))(params, b)
  positions, loss_tokens = b["mask"].size, float(np.sum(b["mask"]))
  want = n_layers * positions * np.log(n_experts) ** 2 / loss_tokens
  # float32 logsumexp of zeros (~1 ulp) squared, averaged over positions and summed over <= 3 layers: ~1e-6.
  np.testing.assert_allclose(float(metrics["z_loss"]), want, rtol=1e-5)
  loss, m = loop.lm_loss(cfg, z_loss=1e-3)(params, b)
  # The same float32 sum (nll ~5 plus the z-loss term) unjitted: a few ulps of the total, far inside 1e-5 relative.
  np.testing.assert_allclose(float(loss), float(m["nll"]) + 1e-3 * want, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Trainable sets and the router learning-rate multiplier.

def test_final_norm_trains_in_sft_only(base):
  branch, bcfg = upcycle(base, CFG)
  rules = {p: freeze.make_partition(branch, bcfg, freeze.SCHEDULE[p]).as_dict() for p in ("midtrain", "sft", "router")}
  assert rules["sft"]["final_norm/scale"] == "all"
  assert rules["sft"]["embed/embedding"] == "all"
  assert rules["midtrain"]["final_norm/scale"] is None and rules["router"]["final_norm/scale"] is None
  assert rules["sft"]["layers/mlp_norm/scale"] is None and rules["sft"]["layers/attn/q/kernel"] is None


def test_router_lr_multiplier_scales_only_the_router_update():
  def first_update(mult):
    opt = opt_defaults(lr=1e-3, warmup_steps=0, end_lr_frac=0.0, clip_norm=0.0, schedule="constant",
                       router_lr_mult=mult)
    tx, _ = optim.adamw(opt, 10)
    params = {ROUTER: jnp.ones((2, 3, 4)), "embed/embedding": jnp.ones((5, 3))}
    grads = {ROUTER: jnp.full((2, 3, 4), 0.3), "embed/embedding": jnp.full((5, 3), -0.2)}
    updates, _ = tx.update(grads, tx.init(params), params)
    return {p: np.asarray(u) for p, u in updates.items()}
  one, ten = first_update(1.0), first_update(10.0)
  np.testing.assert_allclose(ten[ROUTER], 10 * one[ROUTER], rtol=1e-6)  # one float32 multiply
  np.testing.assert_array_equal(ten["embed/embedding"], one["embed/embedding"])
  np.testing.assert_allclose(one[ROUTER], -1e-3, rtol=1e-4)  # Adam's first step is lr * sign(g) (eps 1e-8 / 0.3)


# ----------------------------------------------------------------------------------------------------------------
# The routing table: mean applied router weight per expert on each domain's tokens, against transformers' Mixtral
# router logits (an independent forward) reduced in numpy.

@pytest.mark.parametrize("top_k,norm_topk", [(0, False), (2, True)])
def test_weight_table_matches_mixtral_router_logits(tmp_path, top_k, norm_topk):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from bar_jax.evals import routing
  from bar_jax.io import hf
  cfg = tiny(vocab_size=128, rms_eps=1e-5, ffn="moe", n_experts=3, top_k=top_k, norm_topk=norm_topk)
  rng = np.random.default_rng(3)
  shapes = pytree.flatten(transformer.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
  params = pytree.unflatten({p: (rng.uniform(0.5, 1.5, s) if p.endswith("scale") else
                                 rng.standard_normal(s) / np.sqrt(s[-2] if len(s) > 1 else 1)).astype(np.float32)
                             for p, s in shapes.items()})
  params["layers"]["moe"]["router"]["kernel"] *= 4  # far from uniform routing
  t = 16
  rows = {d: {"inputs": rng.integers(0, cfg.vocab_size, (2, t)).astype(np.int32),
              "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (2, t)),
              "segment_ids": np.ones((2, t), np.int32)} for d in ("math", "code")}
  report = routing.weight_table(params, cfg, rows, batch_size=1, names=["anchor", "math", "code"])

  hf.save_dir(str(tmp_path / "hf"), cfg, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
  for d, r in rows.items():
    with torch.no_grad():
      out = model(torch.tensor(r["inputs"], dtype=torch.long), output_router_logits=True)
    want = []
    for logits in out.router_logits:  # per layer [B * T, E]
      z = np.asarray(logits, np.float64)
      p = np.exp(z - z.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      if cfg.k < cfg.n_experts:
        p = np.where(p >= np.sort(p, -1)[:, -cfg.k][:, None], p, 0.0)
        p /= p.sum(-1, keepdims=True)
      want.append(p.mean(0))
    # float32 logits from two implementations differ by ~1e-5 (2 layers of D=32 sums); weights are softmax of them.
    np.testing.assert_allclose(report["domains"][d]["mean_weight"], np.asarray(want), atol=2e-5)
    assert report["domains"][d]["tokens"] == 2 * t
  w = np.asarray(report["domains"]["math"]["mean_weight"])
  # Each layer's E float32 means of weights that sum to 1 per token (6 decimals in the report): 1 within 1e-5.
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  assert w.max() - w.min() > 0.05  # not uniform, so the comparison can fail
  summ = routing.weight_summary(report)
  # The summary rounds its shares to 4 decimals for the table: within half of 1e-4 of the layer mean.
  assert summ["math"]["own"] == pytest.approx(float(np.mean(w, 0)[1]), abs=1e-4)
  assert 1 <= summ["code"]["own_rank"] <= 3
  assert "mean_weight" in routing.format_table(report, "mean_weight")


def test_domain_embedding_router_columns():
  """experiments/routing_fix.py's beyond-the-paper init: column e = the unit-length centred mean embedding."""
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "routing_fix.py")
  spec = importlib.util.spec_from_file_location("routing_fix", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  emb = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
  tokens = [np.array([[0, 1], [2, 3]]), np.array([[5, 6, 7]]), np.array([[9]])]
  router = mod.domain_embedding_router(emb, tokens, n_layers=3, scale=2.0)
  assert router.shape == (3, 4, 3) and np.array_equal(router[0], router[2])
  means = np.stack([emb[[0, 1, 2, 3]].mean(0), emb[[5, 6, 7]].mean(0), emb[9]]).astype(np.float64)
  want = means - means.mean(0)
  want = 2.0 * want / np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(router[1], want.T, rtol=1e-6, atol=1e-6)  # float64 values rounded once to float32
