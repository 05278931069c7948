"""Sharding rules: experts on `expert`, embed on `fsdp`, heads/mlp/vocab on `tensor`; a sharded forward equals the
1-device forward; at a 7B shape every large leaf is split over every mesh axis it can use."""
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bar_jax import sharding
from bar_jax.errors import BarError
from bar_jax.model import transformer
from bar_jax.model.config import Compute, ModelConfig, tiny
from numerics import ulps

CFG = tiny(ffn="moe", n_experts=2)
MESH_SHAPE = {"fsdp": 2, "expert": 2, "tensor": 2}


def test_param_shardings_follow_the_rules():
  mesh = sharding.make_mesh(MESH_SHAPE)
  s = transformer.param_shardings(CFG, mesh)
  moe = s["layers"]["moe"]
  for w in ("gate", "up"):
    assert moe["experts"][w].spec == P(None, "expert", "fsdp", "tensor")
  assert moe["experts"]["down"].spec == P(None, "expert", "tensor", "fsdp")
  # Leaves without an expert dimension are FSDP-split over fsdp and expert together.
  fsdp = ("fsdp", "expert")
  assert moe["router"]["kernel"].spec == P(None, fsdp, None)
  assert s["embed"]["embedding"].spec == P("tensor", fsdp)
  assert s["layers"]["attn"]["q"]["kernel"].spec == P(None, fsdp, "tensor")
  assert s["layers"]["attn"]["o"]["kernel"].spec == P(None, "tensor", fsdp)
  assert s["final_norm"]["scale"].spec == P(None)
  # A rule whose axis does not divide the dimension replicates instead of failing.
  odd = tiny(vocab_size=255)
  assert transformer.param_shardings(odd, mesh)["embed"]["embedding"].spec == P(None, fsdp)
  assert sharding.spec_for(("embed",), (6,), mesh) == P("fsdp")  # 6 splits 2 ways, not 4


@pytest.mark.parametrize("dispatch", ["dense", "expert_parallel"])
def test_sharded_forward_matches_one_device(dispatch):
  cfg, compute = CFG.replace(top_k=1), Compute(dispatch=dispatch)
  params = transformer.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.vocab_size)
  one = jax.devices()[:1]
  ref_mesh = sharding.make_mesh(None, devices=one)
  want = jax.jit(lambda p, t: transformer.forward(p, t, cfg, compute=compute, mesh=ref_mesh)[0])(
      jax.device_put(params, one[0]), jax.device_put(tokens, one[0]))

  mesh = sharding.make_mesh(MESH_SHAPE)
  ps = transformer.param_shardings(cfg, mesh)
  f = jax.jit(lambda p, t: transformer.forward(p, t, cfg, compute=compute, mesh=mesh)[0],
              in_shardings=(ps, sharding.batch_sharding(mesh)))
  got = f(jax.device_put(params, ps), jax.device_put(tokens, sharding.batch_sharding(mesh)))
  assert len(got.sharding.device_set) == 8
  # Sharded sums (FSDP/tensor partial sums, all-to-all dispatch) add the D=32 / F=64 terms in another order than one
  # device does: tens of float32 ulps of the largest logit.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=ulps(want, 64))
  assert float(np.abs(np.asarray(want)).max()) > 0.1


def _per_device_bytes(cfg: ModelConfig, mesh) -> int:
  shapes = transformer.param_shapes(cfg)
  shards = transformer.param_shardings(cfg, mesh)
  is_shape = lambda x: isinstance(x, tuple)
  sizes = jax.tree.map(lambda shp, s: math.prod(s.shard_shape(shp)) * 4, shapes, shards, is_leaf=is_shape)
  return sum(jax.tree.leaves(sizes))


def test_7b_branch_shards_evenly():
  """Llama-2-7B shape as a 2-expert branch: fsdp=8 and fsdp=4 x expert=2 both hold ~1/8 of the bytes per device."""
  cfg = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                    d_ff=11008, tie_embeddings=False, ffn="moe", n_experts=2)
  total = sum(math.prod(s) for s in jax.tree.leaves(transformer.param_shapes(cfg),
                                                     is_leaf=lambda x: isinstance(x, tuple))) * 4
  assert 10.5e9 < total / 4 < 11.5e9  # 6.7B dense + one more FFN copy
  for shape in ({"fsdp": 8}, {"fsdp": 4, "expert": 2}, {"fsdp": 4, "tensor": 2}):
    mesh = jax.sharding.AbstractMesh((shape.get("data", 1), shape.get("fsdp", 1), shape.get("expert", 1),
                                      shape.get("tensor", 1)), sharding.MESH_AXES)
    per = _per_device_bytes(cfg, mesh)
    assert per <= total / 8 * 1.001, (shape, per, total / 8)  # norms (replicated) are the only excess


def test_bad_mesh():
  with pytest.raises(BarError, match="does not divide"):
    sharding.make_mesh({"fsdp": 3, "data": -1})


def test_expert_slices_stay_split_over_every_device():
  """A branch's trainable expert slice [L, 1, D, F] cannot use the expert axis on its size-1 dimension: the axis
  moves onto the embed dimension, so on (fsdp=2, expert=2, tensor=2) the slice is still split 8 ways."""
  mesh = sharding.make_mesh(MESH_SHAPE)
  full = transformer.param_shardings(CFG, mesh)["layers"]["moe"]["experts"]["gate"]
  sliced = jax.ShapeDtypeStruct((CFG.n_layers, 1, CFG.d_model, CFG.d_ff), np.float32)
  s = sharding.slice_sharding(full, sliced)
  assert s.spec == P(None, None, ("fsdp", "expert"), "tensor")
  assert math.prod(s.shard_shape(sliced.shape)) * 8 == math.prod(sliced.shape)
