"""The three MoE dispatch paths agree in forward and gradient; expert-parallel drops match a plain-numpy reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bar_jax.model import dispatch, moe
from bar_jax.model.config import Compute, tiny

AUTO = (jax.sharding.AxisType.Auto,) * 4
N_TOKENS = 64  # B * T; divisible by every batch-shard count used here


def make_mesh(data=1, expert=1):
  shape = (data, 1, expert, 1)
  return jax.make_mesh(shape, ("data", "fsdp", "expert", "tensor"), axis_types=AUTO,
                       devices=jax.devices()[:data * expert])


def layer(n_experts, key=0, d=16, f=32):
  ks = jax.random.split(jax.random.key(key), 5)
  p = {"router": {"kernel": jax.random.normal(ks[0], (d, n_experts)) * 0.5},
       "experts": {"gate": jax.random.normal(ks[1], (n_experts, d, f)) / 4,
                   "up": jax.random.normal(ks[2], (n_experts, d, f)) / 4,
                   "down": jax.random.normal(ks[3], (n_experts, f, d)) / 6}}
  x = jax.random.normal(ks[4], (4, N_TOKENS // 4, d))
  return p, x


def cfg_for(n_experts, top_k, norm_topk, dispatch_kind, capacity_factor=0.0):
  """(architecture, compute): the dispatch path is a run-time choice, not part of the model."""
  return (tiny(d_model=16, d_ff=32, ffn="moe", n_experts=n_experts, top_k=top_k, norm_topk=norm_topk),
          Compute(dispatch=dispatch_kind, capacity_factor=capacity_factor))


@functools.partial(jax.jit, static_argnums=(2, 3))
def value_and_grads(p, x, cfg_and_compute, mesh):
  """Output, drop count, and gradients w.r.t. x, the router kernel and the experts of a random linear loss."""
  cfg, compute = cfg_and_compute

  def loss(p, x):
    y, aux = moe.moe_ffn(p, x, cfg, mesh=mesh, compute=compute)
    probe = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y * probe), (y, aux["dropped"])
  (_, (y, dropped)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
  return y, dropped, grads


# float32 (eps 1.2e-7) values of order 1: the paths sum the D=16 / F=32 products, the k experts and (in gradients)
# the N=64 tokens in different orders, so results differ by up to ~N*eps of the magnitude: 2e-5 bounds that.
TOL = 2e-5


def assert_close(a, b, tol=TOL):
  """Same tree (a missing or extra leaf fails), then leaf by leaf within tol."""
  assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a), jax.tree.structure(b))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("n_experts,top_k,norm_topk", [(4, 1, False), (4, 2, True), (4, 2, False), (4, 4, True)])
def test_dropless_matches_dense_forward_and_gradient(n_experts, top_k, norm_topk):
  p, x = layer(n_experts)
  y0, _, g0 = value_and_grads(p, x, cfg_for(n_experts, top_k, norm_topk, "dense"), None)
  y1, d1, g1 = value_and_grads(p, x, cfg_for(n_experts, top_k, norm_topk, "dropless"), None)
  assert int(d1) == 0
  assert_close(y0, y1)
  assert_close(g0, g1)
  assert float(jnp.abs(g0[0]["router"]["kernel"]).max()) > 0  # the router gradient is really compared


@pytest.mark.parametrize("data,expert,top_k,norm_topk", [
    (1, 1, 2, False),   # a 1-device mesh falls back to dropless
    (8, 1, 2, True),    # no expert axis: dropless on each data shard's tokens
    (1, 8, 1, False), (1, 8, 2, True), (1, 8, 8, False),
    (2, 4, 1, True), (2, 4, 2, False), (2, 4, 4, True),
])
def test_expert_parallel_matches_dense(data, expert, top_k, norm_topk):
  n_experts = max(expert, 4)
  mesh = make_mesh(data, expert)
  p, x = layer(n_experts, key=expert + top_k)
  y0, _, g0 = value_and_grads(p, x, cfg_for(n_experts, top_k, norm_topk, "dense"), None)
  y1, d1, g1 = value_and_grads(p, x, cfg_for(n_experts, top_k, norm_topk, "expert_parallel"), mesh)
  assert int(d1) == 0
  assert_close(y0, y1)
  assert_close(g0, g1)


@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_matmuls_agree_in_forward_and_gradient(top_k):
  """The CPU's batched blocks, its scan over blocks (its own backward pass) and ragged_dot: same outputs and
  gradients w.r.t. tokens and experts, with blocks smaller and larger than the expert groups."""
  p, x = layer(4)
  cfg, _ = cfg_for(4, top_k, False, "dropless")
  xt = x.reshape(-1, 16)
  weights, idx, _ = moe.route(p["router"]["kernel"], xt, cfg)
  probe = jnp.cos(jnp.arange(xt.size, dtype=jnp.float32)).reshape(xt.shape)

  @functools.partial(jax.jit, static_argnames=("impl", "block"))
  def value_and_grad(x, e, impl, block=None):
    return jax.value_and_grad(lambda x, e: jnp.sum(probe * dispatch.dropless(
        x, weights, idx, e["gate"], e["up"], e["down"], impl=impl, block=block)), argnums=(0, 1))(x, e)
  reference = value_and_grad(xt, p["experts"], "ragged")
  assert float(jnp.abs(reference[1][1]["down"]).max()) > 0
  for block in (8, 64):
    for impl in ("blocked", "scanned"):
      assert_close(value_and_grad(xt, p["experts"], impl, block), reference)


def numpy_capacity_reference(p, x, weights, idx, shards, C):
  """Plain numpy: each of `shards` contiguous token slices keeps, per expert, its first C copies in token order."""
  x = np.asarray(x, np.float64)
  N, k = idx.shape
  n = N // shards
  g, u, d = (np.asarray(p["experts"][w], np.float64) for w in ("gate", "up", "down"))
  y = np.zeros_like(x)
  dropped = 0
  for s in range(shards):
    used = {}
    for t in range(s * n, (s + 1) * n):
      for j in range(k):
        e = int(idx[t, j])
        used[e] = used.get(e, 0) + 1
        if used[e] > C:
          dropped += 1
          continue
        a, b = x[t] @ g[e], x[t] @ u[e]
        y[t] += weights[t, e] * ((a / (1 + np.exp(-a)) * b) @ d[e])
  return y, dropped


@pytest.mark.parametrize("data,expert,top_k,capacity_factor", [(1, 8, 2, 0.5), (2, 4, 1, 1.0), (2, 4, 2, 0.75)])
def test_expert_parallel_drops_match_numpy(data, expert, top_k, capacity_factor):
  n_experts = max(expert, 4)
  mesh = make_mesh(data, expert)
  p, x = layer(n_experts, key=7)
  p["router"]["kernel"] = p["router"]["kernel"].at[:, 0].add(1.0)  # skew the routing so expert 0 overflows
  cfg, compute = cfg_for(n_experts, top_k, False, "expert_parallel", capacity_factor)
  y, dropped, _ = value_and_grads(p, x, (cfg, compute), mesh)
  weights, idx, _ = moe.route(p["router"]["kernel"], x.reshape(-1, 16), cfg)
  shards = data * expert
  C = dispatch.capacity(N_TOKENS // shards, top_k, n_experts, capacity_factor)
  y_ref, dropped_ref = numpy_capacity_reference(p, x.reshape(-1, 16), np.asarray(weights), np.asarray(idx), shards, C)
  assert dropped_ref > 0
  assert int(dropped) == dropped_ref
  # The float64 reference against float32 dispatch: the same ~N*eps bound as between the paths.
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), y_ref, rtol=TOL, atol=TOL)
