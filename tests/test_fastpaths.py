"""The MoE fast paths equal the materialised per-expert computation they replace, in forward and in gradients.

Reference: every expert's weights materialised (`moe.expert_weights`: anchor + a @ b * alpha/r for LoRA), each expert
run as its own SwiGLU on every token, the outputs summed with the top-k-masked router weights. Checked against it:
  - LoRA experts as a side path (`moe.lora_ffn`), for every dispatch setting;
  - ffn experts at top_k = E as one wide FFN (`moe.dense_dispatch`), for every dispatch setting;
on a 1-device mesh and on 8 devices (data-parallel, and data x expert for expert_parallel).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bar_jax import sharding
from bar_jax.model import moe
from bar_jax.model.config import Compute, tiny

D, F, N_TOKENS, RANK = 16, 32, 64, 4
DISPATCH = ("dense", "dropless", "expert_parallel")
MESHES = {"1": {"data": 1}, "8": {"data": 8}, "2x4": {"data": 2, "expert": 4}}


def mesh_for(name):
  shape = MESHES[name]
  n = int(np.prod(list(shape.values())))
  return sharding.make_mesh(shape, devices=jax.devices()[:n])


def cfg_for(n_experts, top_k, kind):
  return tiny(d_model=D, d_ff=F, ffn="moe", n_experts=n_experts, top_k=top_k, expert_kind=kind, lora_rank=RANK,
              lora_alpha=8.0)


def layer(cfg, key=0):
  """One layer's parameters with every leaf random (LoRA b too, so the adapters really differ from the anchor)."""
  shapes = moe.param_shapes(cfg.replace(n_layers=1))
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(jax.random.key(key), len(leaves) + 1)
  # Scaled so every projection keeps unit-size activations (1/sqrt(fan_in)); the router gets logits of size ~1.
  out = [jax.random.normal(k, s[1:]) / np.sqrt(s[-2]) for k, s in zip(keys, leaves)]
  p = jax.tree.unflatten(treedef, out)
  x = jax.random.normal(keys[-1], (8, N_TOKENS // 8, D))
  return p, x


def reference_ffn(p, x, cfg, mesh=None, compute=None):
  """Materialised experts, one SwiGLU per expert on every token, combined by the router weights."""
  xt = x.reshape(-1, D)
  weights, idx, logits = moe.route(p["router"]["kernel"], xt, cfg)
  gate, up, down = moe.expert_weights(p, cfg)
  y = sum(weights[:, e:e + 1] * ((jax.nn.silu(xt @ gate[e]) * (xt @ up[e])) @ down[e]) for e in range(cfg.n_experts))
  aux = moe.router_losses(logits, weights, idx, cfg.n_experts)
  return y.reshape(x.shape), dict(aux, dropped=jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def value_and_grads(p, x, cfg, mesh, fn, dispatch="dense"):
  """Output and gradients w.r.t. x and every parameter of a fixed random linear loss (+ the z-loss)."""
  def loss(p, x):
    y, aux = fn(p, x, cfg, mesh=mesh, compute=Compute(dispatch=dispatch))
    probe = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y * probe) + 0.1 * aux["z_loss"], (y, aux["dropped"])
  (_, (y, dropped)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
  return y, dropped, grads


def place(p, x, cfg, mesh):
  """x split over the batch axes; each parameter sharded by its logical axes (experts over an expert axis)."""
  axes = moe.logical_axes(cfg)
  specs = jax.tree.map(lambda a, w: sharding.spec_for(a[1:], w.shape, mesh), axes, p,
                       is_leaf=lambda a: isinstance(a, tuple))
  p = jax.tree.map(lambda w, s: jax.device_put(w, NamedSharding(mesh, s)), p, specs,
                   is_leaf=lambda s: isinstance(s, P))
  return p, jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES)))


def assert_close(got, want):
  # fp32 (eps 1.2e-7): each value is a sum over <= N*E*F = 64*4*32 ~ 8e3 products of O(1) terms, reassociated between
  # the paths; relative error ~ eps * sqrt(8e3) * a few chained products ~ 1e-5 of the leaf's largest entry.
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g), np.asarray(w)
    scale = max(float(np.abs(w).max()), 1e-3)
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * scale)


CASES = [(mesh, dispatch) for mesh in ("1", "8") for dispatch in DISPATCH] + [("2x4", "expert_parallel")]


@pytest.mark.parametrize("mesh_name,dispatch", CASES)
@pytest.mark.parametrize("n_experts,top_k", [(2, 0), (4, 2)])  # the branch; a merged MoE at top-k
def test_lora_side_path_equals_materialised(mesh_name, dispatch, n_experts, top_k):
  cfg = cfg_for(n_experts, top_k, "lora")
  mesh = mesh_for(mesh_name)
  p, x = place(*layer(cfg, key=n_experts + top_k), cfg, mesh)
  y0, _, g0 = value_and_grads(p, x, cfg, None, reference_ffn)
  y1, dropped, g1 = value_and_grads(p, x, cfg, mesh, moe.moe_ffn, dispatch)
  assert int(dropped) == 0
  assert_close(y1, y0)
  assert_close(g1, g0)
  assert float(jnp.abs(g0[0]["lora"]["down"]["b"]).max()) > 0  # the adapters' gradients are really compared


@pytest.mark.parametrize("mesh_name,dispatch", CASES)
def test_all_experts_wide_ffn_equals_per_expert(mesh_name, dispatch):
  n_experts = 4
  cfg = cfg_for(n_experts, 0, "ffn")  # top_k 0 = all experts
  mesh = mesh_for(mesh_name)
  p, x = place(*layer(cfg, key=7), cfg, mesh)
  y0, _, g0 = value_and_grads(p, x, cfg, None, reference_ffn)
  y1, dropped, g1 = value_and_grads(p, x, cfg, mesh, moe.moe_ffn, dispatch)
  assert int(dropped) == 0
  assert_close(y1, y0)
  assert_close(g1, g0)
  assert float(jnp.abs(g0[0]["router"]["kernel"]).max()) > 0


@pytest.mark.parametrize("top_k", [1, 2])
def test_dense_dispatch_top_k_equals_per_expert(top_k):
  """The wide FFN with router weights zero off the top-k is the masked sum too (dense dispatch at top_k < E)."""
  cfg = cfg_for(4, top_k, "ffn")
  p, x = layer(cfg, key=top_k)
  y0, _, g0 = value_and_grads(p, x, cfg, None, reference_ffn)
  y1, _, g1 = value_and_grads(p, x, cfg, None, moe.moe_ffn)
  assert_close(y1, y0)
  assert_close(g1, g0)


def _shapes_in(jaxpr) -> set:
  out = set()
  for eqn in jaxpr.eqns:
    out.update(tuple(v.aval.shape) for v in eqn.outvars)
    for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
      out |= _shapes_in(sub)
  return out


def test_fast_paths_build_no_per_expert_weights_or_outputs():
  """The LoRA path never forms an (E-1, D, F) expert, and the wide FFN never forms the [E, N, D] expert outputs."""
  lora = cfg_for(4, 0, "lora")
  p, x = layer(lora)
  shapes = _shapes_in(jax.make_jaxpr(jax.grad(lambda p: moe.moe_ffn(p, x, lora)[0].sum()))(p).jaxpr)
  assert not shapes & {(3, D, F), (3, F, D), (4, D, F), (4, F, D)}, shapes
  ref = _shapes_in(jax.make_jaxpr(lambda p: moe.expert_weights(p, lora))(p).jaxpr)
  assert (4, D, F) in ref  # the check sees materialised experts where they exist
  ffn = cfg_for(4, 0, "ffn")
  p, x = layer(ffn)
  shapes = _shapes_in(jax.make_jaxpr(jax.grad(lambda p: moe.moe_ffn(p, x, ffn)[0].sum()))(p).jaxpr)
  assert (4, N_TOKENS, D) not in shapes and (N_TOKENS, 4, D) not in shapes, shapes


def test_branch_step_skips_the_frozen_anchors_weight_gradient():
  """In the midtrain step (anchor frozen) XLA must not compute the anchor's weight gradients: compiled FLOPs fall by
  at least those matmuls (2 N D F each for gate, up, down) against the same step with the anchor trainable."""
  import optax
  from bar_jax.model import transformer
  from bar_jax.stages import loop
  from bar_jax.transforms import freeze
  cfg = tiny(ffn="moe", n_experts=2)
  B, T = 4, 32
  params = transformer.init_params(cfg, jax.random.key(0))
  tok = np.zeros((1, B, T), np.int32)
  batch = {"inputs": tok, "targets": tok, "mask": np.ones((1, B, T), np.float32),
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)), "segment_ids": np.ones_like(tok)}
  tx = optax.sgd(1e-3)

  def flops(frozen_experts):
    part = freeze.make_partition(params, cfg, freeze.SCHEDULE["midtrain"], frozen_experts=frozen_experts)
    trainable, frozen = freeze.split(params, part)
    step = jax.jit(loop.make_step(loop.lm_loss(cfg), tx, part, 1))
    cost = step.lower(trainable, tx.init(trainable), frozen, batch).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  anchor_weight_grads = 3 * 2 * B * T * cfg.d_model * cfg.d_ff  # one layer (XLA counts a loop body once)
  saved = flops(()) - flops((0,))
  assert saved >= 0.9 * anchor_weight_grads, (saved, anchor_weight_grads)


def _saved_of_hidden_shape(fn, args, capsys) -> tuple[int, int]:
  """(residuals of an [.., N, F] hidden shape named as FFN projections, all others of that shape) that fn's
  backward pass keeps, as jax.ad_checkpoint.print_saved_residuals lists them."""
  from jax.ad_checkpoint import print_saved_residuals
  capsys.readouterr()
  print_saved_residuals(fn, *args)
  lines = [ln for ln in capsys.readouterr().out.splitlines() if f"{N_TOKENS},{F}]" in ln.split(" ")[0]]
  named = sum(moe.PROJECTION in ln for ln in lines)
  return named, len(lines) - named


@pytest.mark.parametrize("kind", ["lora", "ffn", "dense"])
def test_ffn_backward_keeps_only_the_projections(kind, capsys):
  """Each FFN keeps x @ W_gate and x @ W_up per expert for its backward pass (LoRA: the anchor's, once) and recomputes
  the elementwise rest; the same function without the checkpoint keeps more, so the count is what the decorator
  decides."""
  from bar_jax.model import transformer
  cfg = cfg_for(2 if kind == "lora" else 4, 0, "lora" if kind == "lora" else "ffn")
  p, x = layer(cfg)
  xt = x.reshape(-1, D)
  w = jax.nn.softmax(xt @ p["router"]["kernel"])
  e = p["experts"]
  if kind == "lora":
    fn, args, want = moe.lora_ffn, (xt, w, e, p["lora"], 2.0), 2
  elif kind == "ffn":
    fn, args, want = moe.dense_dispatch, (xt, w, e["gate"], e["up"], e["down"]), 2 * cfg.n_experts
  else:
    fn, args, want = transformer.swiglu, (xt, e["gate"][0], e["up"][0], e["down"][0]), 2
  assert _saved_of_hidden_shape(fn, args, capsys) == (want, 0)
  named, other = _saved_of_hidden_shape(fn.__wrapped__, args, capsys)
  assert named + other > want
