"""bar_jax/transforms/baselines.py against numpy: the dense average and the BTX MoE, leaf by leaf."""
import jax
import numpy as np
import pytest

from bar_jax.errors import BarError
from bar_jax.model import config as config_lib, transformer
from bar_jax.pytree import flatten
from bar_jax.transforms import baselines

MLP = ("gate", "up", "down")


@pytest.fixture(scope="module")
def models():
  cfg = config_lib.tiny()
  base, a, b, c = (jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(i))) for i in range(4))
  return cfg, base, [a, b, c]


def _mean64(xs):
  """The numpy reference: the float64 mean of float32 leaves, rounded once to float32."""
  return np.stack([x.astype(np.float64) for x in xs]).mean(0).astype(np.float32)


def test_average_dense_is_the_leafwise_mean(models):
  cfg, _, fine = models
  avg = flatten(baselines.average_dense(fine))
  flats = [flatten(f) for f in fine]
  assert set(avg) == set(flats[0])
  for path, leaf in avg.items():
    assert leaf.dtype == np.float32
    np.testing.assert_array_equal(leaf, _mean64([f[path] for f in flats]), err_msg=path)
  # The mean of identical models is the model itself, bit for bit (one rounding, of an exact value).
  same = flatten(baselines.average_dense([fine[0]] * 3))
  for path, leaf in same.items():
    np.testing.assert_array_equal(leaf, flats[0][path], err_msg=path)


def test_btx_moe_stacks_the_fine_tunes_ffns_and_averages_the_rest(models):
  cfg, base, fine = models
  moe, mcfg = baselines.btx_moe(base, fine, cfg)
  assert (mcfg.ffn, mcfg.n_experts, mcfg.top_k) == ("moe", 4, 0)
  experts = moe["layers"]["moe"]["experts"]
  for w in MLP:  # [L, E, ...]: anchor = the base FFN, expert i = fine-tune i's FFN, bit for bit
    assert experts[w].shape[1] == 4
    for i, src in enumerate([base] + fine):
      np.testing.assert_array_equal(experts[w][:, i], src["layers"]["mlp"][w]["kernel"], err_msg=f"{w} {i}")
  np.testing.assert_array_equal(moe["layers"]["moe"]["router"]["kernel"], 0.0)  # uniform until a router trains
  assert moe["layers"]["moe"]["router"]["kernel"].shape == (cfg.n_layers, cfg.d_model, 4)
  # Every shared leaf is the mean over the fine-tunes (the base's own shared leaves take no part).
  shared = {p: v for p, v in flatten(moe).items() if not p.startswith("layers/moe/")}
  flats = [flatten(f) for f in fine]
  assert set(shared) == {p for p in flats[0] if not p.startswith("layers/mlp/")}
  for path, leaf in shared.items():
    np.testing.assert_array_equal(leaf, _mean64([f[path] for f in flats]), err_msg=path)
  # The MoE runs: finite logits of the right shape.
  logits, _ = transformer.forward(moe, np.zeros((1, 4), np.int32), mcfg)
  assert logits.shape == (1, 4, cfg.vocab_size) and np.isfinite(np.asarray(logits)).all()


def test_builders_refuse_what_they_cannot_build(models):
  cfg, base, fine = models
  with pytest.raises(BarError, match="at least one"):
    baselines.average_dense([])
  with pytest.raises(BarError, match="at least one"):
    baselines.btx_moe(base, [], cfg)
  other = dict(fine[0], extra={"kernel": np.zeros(2, np.float32)})
  with pytest.raises(BarError, match="different parameters"):
    baselines.average_dense([fine[0], other])
