"""The grouped matmul each backend runs (bar_jax/model/dispatch.py): megablox in interpret mode on the CPU against a
float64 numpy reference (forward, d(x), d(W); empty groups; sizes that are not tile multiples), through dropless
and under shard_map on 8 simulated devices against the dense every-token-through-every-expert formula; "auto" never
picks ragged_dot. Compile checks for real targets run where the accelerator extras are installed
(requirements-tpu.txt / requirements-gpu.txt) and are skipped otherwise."""
import functools
import importlib.util
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bar_jax.model import dispatch
from tests.numerics import ulps

AUTO = (jax.sharding.AxisType.Auto,) * 4


def _groups(x, w, sizes):
  """float64 numpy: rows of group g through w[g]; rows past sum(sizes) zero."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  y = np.zeros((x.shape[0], w.shape[2]))
  start = 0
  for g, n in enumerate(np.asarray(sizes)):
    y[start:start + n] = x[start:start + n] @ w[g]
    start += n
  return y


def _numpy_value_and_grads(x, w, sizes, probe):
  """loss = sum(probe * y): d(loss)/dx and d(loss)/dW by hand (each group's rows only)."""
  x64, w64, p = (np.asarray(a, np.float64) for a in (x, w, probe))
  dx, dw = np.zeros_like(x64), np.zeros_like(w64)
  start = 0
  for g, n in enumerate(np.asarray(sizes)):
    rows = slice(start, start + n)
    dx[rows] = p[rows] @ w64[g].T
    dw[g] = x64[rows].T @ p[rows]
    start += n
  return _groups(x, w, sizes), dx, dw


# M = 200 rows (not a multiple of the 128-row tile), K = 24, N = 40 (neither a multiple of 128); one group empty,
# one of a single row, and in the second case 17 rows past the groups (they must come out zero).
@pytest.mark.parametrize("sizes", [[70, 0, 129, 1], [0, 100, 0, 83]])
def test_megablox_matches_numpy_forward_and_both_gradients(sizes):
  M, K, N, G = 200, 24, 40, 4
  ks = jax.random.split(jax.random.key(sum(sizes)), 3)
  x = jax.random.normal(ks[0], (M, K))
  w = jax.random.normal(ks[1], (G, K, N))
  probe = jax.random.normal(ks[2], (M, N))
  sizes = jnp.asarray(sizes, jnp.int32)

  def loss(x, w):
    y = dispatch.grouped_matmul(x, w, sizes, "megablox", interpret=True)
    return jnp.sum(probe * y), y
  (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
  ry, rdx, rdw = _numpy_value_and_grads(x, w, sizes, probe)
  # float32 sums of K = 24 (y), N = 40 (dx) and up to 129 (dW) products of order-1 values: a few ulps per term of
  # the largest value bounds the reordering; 4 ulps x the term count is generous and still far below any misrouted
  # row (an error of order 1).
  np.testing.assert_allclose(y, ry, rtol=0, atol=ulps(ry, 4 * K))
  np.testing.assert_allclose(dx, rdx, rtol=0, atol=ulps(rdx, 4 * N))
  np.testing.assert_allclose(dw, rdw, rtol=0, atol=ulps(rdw, 4 * 129))
  assert np.all(np.asarray(y)[int(sizes.sum()):] == 0) and np.all(np.asarray(dx)[int(sizes.sum()):] == 0)
  assert np.all(np.asarray(dw)[np.asarray(sizes) == 0] == 0)   # an empty group's weight gradient is zero


def _layer(n_tokens=64, d=16, f=24, n_experts=4, key=0):
  ks = jax.random.split(jax.random.key(key), 5)
  x = jax.random.normal(ks[0], (n_tokens, d))
  experts = {"gate": jax.random.normal(ks[1], (n_experts, d, f)) / 4,
             "up": jax.random.normal(ks[2], (n_experts, d, f)) / 4,
             "down": jax.random.normal(ks[3], (n_experts, f, d)) / 5}
  # Each token's two distinct experts among 0..2, so expert 3 gets no token (an empty group), with softmax weights;
  # weights are zero off the top-k, as moe.route gives them.
  t = jnp.arange(n_tokens)
  first = t % 3
  idx = jnp.stack([first, (first + 1 + (t // 3) % 2) % 3], axis=1)
  w2 = jax.nn.softmax(jax.random.normal(ks[4], (n_tokens, 2)), -1)
  weights = jnp.einsum("nke,nk->ne", jax.nn.one_hot(idx, n_experts), w2)
  return x, weights, idx, experts


def _dense_reference(x, weights, experts):
  """Every token through every expert, weighted by its (zero off the top-k) router weight."""
  a = jnp.einsum("nd,edf->enf", x, experts["gate"])
  b = jnp.einsum("nd,edf->enf", x, experts["up"])
  y = jnp.einsum("enf,efd->end", jax.nn.silu(a) * b, experts["down"])
  return jnp.einsum("end,ne->nd", y, weights)


def _value_and_grads(fn, x, experts, probe):
  return jax.jit(jax.value_and_grad(lambda x, e: jnp.sum(probe * fn(x, e)), argnums=(0, 1)))(x, experts)


# float32, values of order 1: the paths sum D = 16 / F = 24 products, 2 experts and (weight gradients) 64 tokens in
# other orders; 64 x 4 ulps of the largest value bounds that.
N_TERMS = 64 * 4


def _assert_close(got, ref):
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=0, atol=ulps(r, N_TERMS)), got, ref)


def test_dropless_megablox_matches_dense_with_an_empty_expert():
  x, weights, idx, experts = _layer()
  assert not (idx == 3).any()
  probe = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
  ref = _value_and_grads(lambda x, e: _dense_reference(x, weights, e), x, experts, probe)
  got = _value_and_grads(lambda x, e: dispatch.dropless(x, weights, idx, e["gate"], e["up"], e["down"],
                                                        impl="megablox", interpret=True), x, experts, probe)
  _assert_close(got, ref)
  assert float(jnp.abs(ref[1][1]["down"][2]).max()) > 0


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 2, 1, 2)])
def test_megablox_under_shard_map_on_8_devices(shape):
  """dispatch.run as the MoE layer calls it, over 8 devices (check_vma off for megablox): each batch shard sorts
  its own tokens, and the replicated experts' gradients are summed over the batch shards, once (a tensor axis,
  over which every shard's computation is repeated, must not multiply them)."""
  mesh = jax.make_mesh(shape, ("data", "fsdp", "expert", "tensor"), axis_types=AUTO)
  x, weights, idx, experts = _layer(key=1)
  probe = jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
  ref = _value_and_grads(lambda x, e: _dense_reference(x, weights, e), x, experts, probe)
  run = functools.partial(dispatch.run, "dropless", mesh=mesh, impl="megablox")
  got = _value_and_grads(lambda x, e: run(x, weights, idx, e["gate"], e["up"], e["down"])[0], x, experts, probe)
  _assert_close(got, ref)


def test_auto_never_picks_a_densifying_grouped_matmul():
  fake = lambda name: types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=name)]))  # noqa: E731
  assert dispatch.auto_impl(fake("tpu")) == "megablox"
  assert dispatch.auto_impl(fake("cuda")) == dispatch.auto_impl(fake("gpu")) == "scanned"
  assert dispatch.auto_impl(fake("cpu")) == dispatch.CPU_IMPL == "scanned"
  assert dispatch.auto_impl() == "scanned"                 # no mesh: the default backend (the CPU here)


# ----------------------------------------------------------------------------------------------------------------
# Compile checks for real targets: need the accelerator extras, in their own environment (setup.sh tpu | gpu).

HAS_TPU = importlib.util.find_spec("libtpu") is not None
HAS_GPU = importlib.util.find_spec("jax_plugins") is not None and \
    importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


@pytest.mark.skipif(not HAS_TPU, reason="libtpu not installed (requirements-tpu.txt: bash setup.sh tpu)")
def test_tpu_megablox_gradient_costs_at_most_2_2x_its_forward():
  from bar_jax import targets
  c = targets.grouped_matmul_costs("tpu:v5:2x2x2", "megablox", m=4096, k=1024, n=2048, groups=8)
  assert c["grad_flops"] <= 2.2 * c["fwd_flops"], c
  assert c["fwd_flops"] <= 1.1 * 2 * 4096 * 1024 * 2048, c   # the sparse 2MKN, not G times it
  r = targets.grouped_matmul_costs("tpu:v5:2x2x2", "ragged", m=4096, k=1024, n=2048, groups=8)
  assert r["grad_flops"] > 2.2 * r["fwd_flops"], r             # the check can fail: ragged_dot's dense d(W)


@pytest.mark.skipif(not HAS_GPU, reason="jax-cuda12-plugin not installed (requirements-gpu.txt: bash setup.sh gpu)")
def test_h100_auto_grouped_ffn_has_no_group_times_rows_temporary():
  from bar_jax import targets
  """The largest array in the compiled forward + gradient (any buffer: parameters, temporaries) is smaller than
  one G x M x F expansion; ragged_dot's is exactly that size."""
  c = targets.grouped_ffn_temps("gpu:h100x8", dispatch.GPU_IMPL, m=4096, d=1024, f=2048, groups=8)
  assert c["largest_temp_elems"] < 8 * 4096 * 2048, c
  assert targets.grouped_ffn_temps("gpu:h100x8", "ragged", m=4096, d=1024, f=2048,
                                   groups=8)["largest_temp_elems"] >= 8 * 4096 * 2048   # the check can fail


@pytest.mark.skipif(not HAS_GPU, reason="jax-cuda12-plugin not installed (requirements-gpu.txt: bash setup.sh gpu)")
def test_h100_mosaic_gpu_grouped_matmul_forward_compiles_without_temporaries():
  """The Hopper kernel (not picked by auto until a device has checked it): its forward compiles deviceless for an
  H100 with no temporary at all; the largest array is the weights [G, K, N] themselves."""
  from bar_jax import targets
  t = targets.get("gpu:h100x8")
  x, w, s = targets._one_device(t, ((8192, 2048), jnp.bfloat16), ((8, 2048, 5632), jnp.bfloat16),
                                ((8,), jnp.int32))
  c = jax.jit(lambda x, w, s: dispatch.grouped_matmul(x, w, s, "mosaic_gpu")).lower(x, w, s).compile()
  assert c.memory_analysis().temp_size_in_bytes == 0
  assert targets.largest_array(c.as_text()) == 8 * 2048 * 5632
