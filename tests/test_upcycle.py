"""A fresh branch reproduces the dense base; experts, adapters and router are laid out as bar_jax/model/moe.py says."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bar_jax.errors import BarError
from bar_jax.model import transformer
from bar_jax.model.config import tiny
from bar_jax.transforms.upcycle import upcycle
from numerics import ulps

CFG = tiny()
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
forward = jax.jit(lambda p, t, cfg: transformer.forward(p, t, cfg)[0], static_argnums=2)


def rounding_tolerance(logits) -> float:
  """How far two float32 programs that compute the same logits may disagree: a fresh branch runs the FFN as an expert
  einsum weighted by the router, the base as one matmul, so XLA may block the F=64- and D=32-term sums differently
  (and differently on each CPU). Each reordering moves a sum by a few ulps; two layers, the final norm and the LM head
  compound that to tens of ulps of the largest logit, so allow 64 (1.9e-6, ~4 ulps, was seen on an AMD EPYC)."""
  return ulps(logits, 64)


@pytest.fixture(scope="module")
def base():
  return transformer.init_params(CFG, jax.random.key(0))


@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_fresh_branch_reproduces_base_logits(base, kind):
  branch, bcfg = upcycle(base, CFG, expert_kind=kind, lora_rank=4)
  assert bcfg.ffn == "moe" and bcfg.n_experts == 2 and bcfg.expert_kind == kind and bcfg.k == 2
  want = forward(base, TOKENS, CFG)
  got = forward(branch, TOKENS, bcfg)
  # Zero router: weights exactly 0.5 and 0.5 of two identical expert outputs, so only rounding differs.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=rounding_tolerance(want))
  assert float(jnp.abs(want).max()) > 0.1


def test_random_router_and_expert_init(base):
  other = transformer.init_params(CFG, jax.random.key(5))
  branch, bcfg = upcycle(base, CFG, expert_init=other, key=jax.random.key(3))
  moe = branch["layers"]["moe"]
  assert moe["router"]["kernel"].shape == (CFG.n_layers, CFG.d_model, 2)
  assert 0 < float(jnp.abs(moe["router"]["kernel"]).max()) < 0.2
  for w in ("gate", "up", "down"):
    np.testing.assert_array_equal(moe["experts"][w][:, 0], base["layers"]["mlp"][w]["kernel"])
    np.testing.assert_array_equal(moe["experts"][w][:, 1], other["layers"]["mlp"][w]["kernel"])
  assert "mlp" not in branch["layers"]
  assert branch["embed"]["embedding"] is base["embed"]["embedding"]  # shared leaves are not copied
  # With expert 1 equal to the anchor, a small random router still gives the base's logits up to rounding.
  # p * y + (1 - p) * y = y up to rounding: the same bound as a zero router.
  same, scfg = upcycle(base, CFG, key=jax.random.key(3))
  want = forward(base, TOKENS, CFG)
  np.testing.assert_allclose(np.asarray(forward(same, TOKENS, scfg)), np.asarray(want), rtol=0,
                             atol=rounding_tolerance(want))


def test_lora_layout(base):
  branch, _ = upcycle(base, CFG, expert_kind="lora", lora_rank=4, lora_alpha=8.0)
  moe = branch["layers"]["moe"]
  L, D, F = CFG.n_layers, CFG.d_model, CFG.d_ff
  assert moe["experts"]["gate"].shape == (L, 1, D, F) and moe["experts"]["down"].shape == (L, 1, F, D)
  assert moe["lora"]["down"]["a"].shape == (L, 1, F, 4) and moe["lora"]["down"]["b"].shape == (L, 1, 4, D)
  assert float(jnp.abs(moe["lora"]["up"]["a"]).max()) > 0 and float(jnp.abs(moe["lora"]["up"]["b"]).max()) == 0


def test_bad_input(base):
  with pytest.raises(BarError, match="expert kind"):
    upcycle(base, CFG, expert_kind="adapter")
  with pytest.raises(BarError, match="expert_init"):
    upcycle(base, CFG, expert_kind="lora", expert_init=base)
  branch, bcfg = upcycle(base, CFG)
  with pytest.raises(BarError, match="already an MoE"):
    upcycle(branch, bcfg)
