"""Attention per backend (bar_jax/model/attention.py): splash attention in interpret mode on packed rows against a
dense softmax written here (outputs and dq/dk/dv, grouped-query heads), inside the model against the xla path, and
under shard_map on 8 simulated devices; "auto" picks per platform."""
import importlib.util
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bar_jax.model import attention, transformer
from bar_jax.model.config import Compute, tiny
from tests.numerics import ulps

AUTO = (jax.sharding.AxisType.Auto,) * 4


def packed(batch, seq, cuts):
  """segment ids and positions of rows packed from segments that end at `cuts` (the rest one more segment)."""
  seg = np.zeros((batch, seq), np.int32)
  pos = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    start, s = 0, 0
    for end in [c + (7 * b) % 20 for c in cuts] + [seq]:   # each row cut a little differently
      seg[b, start:end], pos[b, start:end] = s, np.arange(end - start)
      start, s = end, s + 1
  return jnp.asarray(seg), jnp.asarray(pos)


def reference(q, k, v, seg):
  """Dense softmax attention, causal by index within a segment; KV heads shared by N/KV query heads each."""
  N, KV = q.shape[2], k.shape[2]
  k, v = jnp.repeat(k, N // KV, axis=2), jnp.repeat(v, N // KV, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  T = q.shape[1]
  allowed = (jnp.arange(T)[:, None] >= jnp.arange(T)[None]) & (seg[:, :, None] == seg[:, None, :])
  s = jnp.where(allowed[:, None], s, -jnp.inf)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v)


def qkv(batch, seq, n=4, kv=2, hd=32, key=0):
  ks = jax.random.split(jax.random.key(key), 4)
  return (jax.random.normal(ks[0], (batch, seq, n, hd)), jax.random.normal(ks[1], (batch, seq, kv, hd)),
          jax.random.normal(ks[2], (batch, seq, kv, hd)), jax.random.normal(ks[3], (batch, seq, n, hd)))


def grads(fn, q, k, v, probe):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(probe * fn(q, k, v)), argnums=(0, 1, 2)))(q, k, v)


# float32: a softmax-weighted sum over up to T = 256 keys of order-1 values (and, for dk/dv, over the queries and
# the N/KV heads that share a key): reordered sums move by ~T ulps; 4 x 256 ulps of the largest value bounds them.
N_TERMS = 4 * 256


def assert_close(got, ref):
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=0, atol=ulps(r, N_TERMS)), got, ref)


def test_splash_matches_dense_on_packed_rows_outputs_and_gradients():
  q, k, v, probe = qkv(2, 256)
  seg, pos = packed(2, 256, [40, 41, 170])     # a 1-token segment, and segments across the 128-token blocks
  out = jax.jit(lambda q, k, v: attention.self_attention(q, k, v, pos, seg, "splash"))(q, k, v)
  np.testing.assert_allclose(out, reference(q, k, v, seg), rtol=0, atol=ulps(out, N_TERMS))
  got = grads(lambda q, k, v: attention.self_attention(q, k, v, pos, seg, "splash"), q, k, v, probe)
  assert_close(got, grads(lambda q, k, v: reference(q, k, v, seg), q, k, v, probe))
  # the check can fail: without the segments the first query of a later segment attends the earlier ones
  unsegmented = reference(q, k, v, jnp.zeros_like(seg))
  assert float(jnp.abs(out - unsegmented).max()) > 0.1


def test_splash_inside_the_model_equals_the_xla_path():
  cfg = tiny(n_heads=4, n_kv_heads=2, head_dim=16, d_model=32)
  params = transformer.init_params(cfg, jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(2), (2, 128), 0, cfg.vocab_size)
  seg, pos = packed(2, 128, [50, 90])

  def run(kind):
    return transformer.forward(params, tokens, cfg, compute=Compute(attention=kind), positions=pos,
                               segment_ids=seg)[0]
  ref = jax.jit(lambda: run("xla"))()
  # 2 layers of float32 on logits of order 1-10: attention sums (128 terms) reordered, then the FFN and head.
  np.testing.assert_allclose(jax.jit(lambda: run("splash"))(), ref, rtol=0, atol=ulps(ref, 4 * 128 * 2))


def test_splash_under_shard_map_on_8_devices():
  mesh = jax.make_mesh((2, 4, 1, 1), ("data", "fsdp", "expert", "tensor"), axis_types=AUTO)
  q, k, v, probe = qkv(8, 128, key=3)
  seg, pos = packed(8, 128, [30, 100])
  got = grads(lambda q, k, v: attention.self_attention(q, k, v, pos, seg, "splash", mesh), q, k, v, probe)
  assert_close(got, grads(lambda q, k, v: reference(q, k, v, seg), q, k, v, probe))


@pytest.mark.parametrize("platform,seq,dtype,expected", [
    ("tpu", 4096, jnp.bfloat16, "splash"), ("tpu", 100, jnp.bfloat16, "xla"),
    ("cuda", 4096, jnp.bfloat16, "cudnn"), ("gpu", 4096, jnp.float32, "xla"), ("cpu", 4096, jnp.bfloat16, "xla")])
def test_auto_picks_the_kernel_per_platform(platform, seq, dtype, expected):
  mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]))
  assert attention.pick("auto", mesh, seq, dtype) == expected
  assert attention.pick("splash", mesh, seq, dtype) == "splash"   # named kernels are taken as named


HAS_TPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not HAS_TPU, reason="libtpu not installed (requirements-tpu.txt: bash setup.sh tpu)")
def test_tpu_splash_compiles_without_a_scores_array():
  """One 4096-token row of 32 heads, forward + dq/dk/dv, compiled for one v5p chip: no array as large as the
  [N, T, T] scores (the xla path's), whose compile here is the check that can fail."""
  from bar_jax import sharding, targets
  devs = targets.get("tpu:v5:2x2x2").devices[:1]
  mesh = sharding.make_mesh((1, 1, 1, 1), devices=devs)
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  q = jax.ShapeDtypeStruct((1, 4096, 32, 128), jnp.bfloat16, sharding=row)
  ids = jax.ShapeDtypeStruct((1, 4096), jnp.int32, sharding=row)

  def largest(kind):
    def loss(q, k, v, pos, seg):
      return jnp.sum(attention.self_attention(q, k, v, pos, seg, kind, mesh).astype(jnp.float32))
    c = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q, ids, ids).compile()
    return targets.largest_array(c.as_text())
  scores = 32 * 4096 * 4096
  assert largest("splash") < scores / 8
  assert largest("xla") >= scores


HAS_GPU = importlib.util.find_spec("jax_plugins") is not None and \
    importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


@pytest.mark.skipif(not HAS_GPU, reason="jax-cuda12-plugin not installed (requirements-gpu.txt: bash setup.sh gpu)")
def test_h100_cudnn_rows_without_segments_compile_without_a_mask():
  """cuDNN flash attention compiled for one H100, forward + dq/dk/dv on a 4096-token row of 8 heads: with no
  segment ids it runs is_causal (no T x T array anywhere); packed rows still pass the dense mask as a bias."""
  from bar_jax import sharding, targets
  devs = targets.get("gpu:h100x8").devices[:1]
  mesh = sharding.make_mesh((1, 1, 1, 1), devices=devs)
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  q = jax.ShapeDtypeStruct((1, 4096, 8, 128), jnp.bfloat16, sharding=row)
  ids = jax.ShapeDtypeStruct((1, 4096), jnp.int32, sharding=row)

  def largest(segments: bool):
    def loss(q, k, v, pos, seg):
      out = attention.self_attention(q, k, v, pos, seg if segments else None, "cudnn", mesh)
      return jnp.sum(out.astype(jnp.float32))
    c = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q, ids, ids).compile()
    return targets.largest_array(c.as_text())
  assert largest(False) < 4096 * 4096
  assert largest(True) >= 4096 * 4096     # the gap that is left: packed rows' [B, 1, T, T] bias
