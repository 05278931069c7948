"""Branch + Adapt: each phase of the unfreezing schedule trains only its set, for both expert kinds; bad input."""

import jax
import numpy as np
import pytest

from bar_jax import sharding, train
from bar_jax.errors import BarError
from bar_jax.model import config as config_lib, transformer
from bar_jax.stages import loop
from bar_jax import pytree
from bar_jax.transforms import freeze, upcycle
from tests.test_train import SyntheticBatches, opt


@pytest.fixture(scope="module")
def dense():
  cfg = config_lib.tiny()
  return cfg, transformer.init_params(cfg, jax.random.key(0))


def _anchor_slices(flat):
  """The anchor's parts of every MoE leaf: expert 0 of stacked experts, router column 0."""
  out = {}
  for path, x in flat.items():
    x = np.asarray(x)
    if path == "layers/moe/router/kernel":
      out[path] = x[..., 0]
    elif path.startswith("layers/moe/experts/"):
      out[path] = x[:, 0]
  return out


@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_each_phase_trains_only_its_set_and_loss_falls(dense, kind, tmp_path):
  base_cfg, base = dense
  params, cfg = upcycle.upcycle(base, base_cfg, expert_kind=kind, lora_rank=4, lora_alpha=8.0,
                                key=jax.random.key(1))
  mesh = sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2})
  before = pytree.flatten(params)
  for phase in ("midtrain", "sft", "rl"):
    part = freeze.make_partition(params, cfg, freeze.SCHEDULE[phase], frozen_experts=(0,))
    it = SyntheticBatches(vocab=cfg.vocab_size)
    result = loop.train(params=params, cfg=cfg, part=part, loss_fn=loop.lm_loss(cfg, mesh, z_loss=1e-3),
                        batches=it, opt=opt(3e-2), steps=8, workdir=str(tmp_path / f"{kind}_{phase}"), mesh=mesh,
                        identity={"phase": phase}, checkpoint_every=100, log_every=1)
    after = pytree.flatten(result.params)
    rules = part.as_dict()
    for path, rule in rules.items():
      if rule is None:
        np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(before[path]), err_msg=f"{phase} {path}")
    for path, x in _anchor_slices(before).items():
      np.testing.assert_array_equal(_anchor_slices(after)[path], x, err_msg=f"{phase} anchor of {path}")
    trained = [p for p, r in rules.items() if r is not None]
    assert any(not np.array_equal(np.asarray(after[p]), np.asarray(before[p])) for p in trained)
    # The optimiser only ever saw the trainable part: its moments have exactly the trainable slices' shapes.
    trainable, _ = freeze.split(params, part)
    mu = next(s.mu for s in jax.tree.leaves(result.opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))
    assert sorted(mu) == sorted(trainable)
    assert all(mu[p].shape == trainable[p].shape for p in mu)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0], (phase, losses)
  expected_frozen = {"midtrain": ["embed/embedding", "layers/attn/q/kernel"], "sft": ["layers/attn/q/kernel"]}
  for phase, paths in expected_frozen.items():
    rules = freeze.make_partition(params, cfg, freeze.SCHEDULE[phase]).as_dict()
    assert all(rules[p] is None for p in paths)


def _tiny_branch_config(**kw):
  from configs import branch
  c = branch.get_config("math,tiny")
  for k, v in kw.items():
    setattr(c, k, v)
  return c


@pytest.mark.parametrize("kw, match", [
    (dict(capability="poetry"), "poetry"),
    (dict(expert_kind="moe"), "expert_kind"),
])
def test_bad_branch_config_is_one_line_and_writes_nothing(kw, match, tmp_path):
  with pytest.raises(BarError, match=match):
    train.run(_tiny_branch_config(**kw), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_regex_that_matches_nothing_is_refused(tmp_path):
  c = _tiny_branch_config()
  c.schedule.sft = ["layers/moe/experts/.*", "embed/embeddings"]  # typo: embeddings
  with pytest.raises(BarError, match="embed/embeddings.*matches no parameter"):
    train.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
