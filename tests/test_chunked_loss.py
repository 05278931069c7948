"""The sliced LM cross-entropy: the plain loss and its gradients (numpy float64 reference), and no [B, T, V] buffer
anywhere in its compiled value-and-gradient."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bar_jax.model import loss, transformer
from bar_jax.model.config import tiny
from bar_jax.stages import loop


def numpy_loss_and_grads(h, w, t, m):
  """Masked mean cross-entropy of logits h @ w and its gradients w.r.t. h and w, in float64."""
  h, w, m = (np.asarray(a, np.float64) for a in (h, w, m))
  z = h @ w
  z = z - z.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  ce = -np.log(np.take_along_axis(p, t[..., None], -1)[..., 0])
  n = max(m.sum(), 1.0)
  dz = (p - np.eye(w.shape[1])[t]) * (m / n)[..., None]
  return (ce * m).sum() / n, dz @ w.T, np.einsum("btd,btv->dv", h, dz)


def masked_loss(chunk):
  def f(h, w, t, m):
    return (loss.token_cross_entropy(h, w, t, chunk) * m).sum() / jnp.maximum(m.sum(), 1.0)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


# float32 (eps 1.2e-7) against float64: each logit sums D = 16 products of order 1 and the log-sum-exp V = 300
# terms, so the loss is good to ~1e-6 relative and each gradient entry (a sum over D, or over the B*T = 48
# positions for the head) to ~1e-6 of the largest; 1e-5 bounds both with room and still catches a wrong slice
# (an error of one position's share is ~1/48 of the gradient).
TOL = 1e-5


@pytest.mark.parametrize("chunk", [0, 8, 10, 48])  # auto (one slice), even slices, a padded last slice, one slice
def test_sliced_cross_entropy_matches_numpy_loss_and_gradients(chunk):
  rng = np.random.default_rng(chunk)
  B, T, D, V = 2, 24, 16, 300
  h = rng.normal(size=(B, T, D)).astype(np.float32)
  w = (rng.normal(size=(D, V)) / 2).astype(np.float32)
  t = rng.integers(0, V, (B, T)).astype(np.int32)
  m = (rng.random((B, T)) > 0.3).astype(np.float32)  # SFT's assistant-token mask
  (value, (dh, dw)) = masked_loss(chunk)(h, w, t, m)
  ref, ref_dh, ref_dw = numpy_loss_and_grads(h, w, t, m)
  np.testing.assert_allclose(float(value), ref, rtol=TOL)
  np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=0, atol=TOL * np.abs(ref_dh).max())
  np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=0, atol=TOL * np.abs(ref_dw).max())
  assert np.abs(np.asarray(dh)[m == 0]).max() == 0  # masked positions get no gradient


def largest_buffer(compiled_text: str) -> int:
  """Elements of the largest array shape in an HLO module's text."""
  shapes = re.findall(r"\b(?:f32|bf16|f16|s32|pred)\[([0-9,]+)\]", compiled_text)
  return max(int(np.prod([int(d) for d in s.split(",")])) for s in shapes if s)


def test_sliced_cross_entropy_never_holds_the_full_logits():
  B, T, D, V, chunk = 2, 64, 16, 4096, 16
  args = (jnp.zeros((B, T, D)), jnp.zeros((D, V)), jnp.zeros((B, T), jnp.int32), jnp.ones((B, T)))
  full = B * T * V
  plain = masked_loss(T).lower(*args).compile()
  sliced = masked_loss(chunk).lower(*args).compile()
  assert largest_buffer(plain.as_text()) >= full  # the check sees the plain loss's [B, T, V] logits ...
  assert largest_buffer(sliced.as_text()) <= B * chunk * V  # ... and the sliced loss's largest is one slice's
  assert sliced.memory_analysis().temp_size_in_bytes < full * 4 < plain.memory_analysis().temp_size_in_bytes


def test_training_loss_sliced_equals_plain():
  """loop.lm_loss, the loss every LM stage trains with, is the same function of every parameter sliced or not (tied
  head: the embedding's gradient sums its input and head uses)."""
  cfg = tiny(n_layers=1)
  params = transformer.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(1)
  x = rng.integers(0, cfg.vocab_size, (2, 33)).astype(np.int32)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "mask": (rng.random((2, 32)) > 0.2).astype(np.float32),
           "positions": np.tile(np.arange(32, dtype=np.int32), (2, 1)), "segment_ids": np.ones((2, 32), np.int32)}
  grad = lambda chunk: jax.jit(jax.grad(lambda p: loop.lm_loss(cfg, ce_chunk=chunk)(p, batch)[0]))  # noqa: E731
  assert loss.auto_chunk(32, cfg.vocab_size) == 32  # a tiny model trains on the plain loss
  plain, sliced = grad(0)(params), grad(12)(params)
  # Same float32 function, its head-gradient sum split over slices: a few ulps of values of order 1.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=TOL * max(np.abs(a).max(), 1e-30)),
               plain, sliced)
