"""GRPO, the pure part: group-normalised advantages, per-token log-probs, and the clipped policy-gradient loss.

The loss is a `loss_fn(params, batch) -> (loss, metrics)` for `stages.loop.make_step`, so an RL update is the same
jitted, sharded, donated step as every other stage; the rollout (sampling + scoring) happens outside, between steps.

Rollout batch (numpy, fixed shapes so one program serves every step):
  tokens     [B, T] int32   prompt + response, right-padded
  resp_mask  [B, T-1] f32   1 where target tokens[:, t+1] is a response token (eos included, padding excluded)
  weights    [B, T-1] f32   resp_mask / (response tokens in the whole minibatch) * accum: summing weights * objective
                            over micro-batches and dividing by accum (what make_step does) is the token-level mean
                            over the minibatch, exactly
  advantages [B] f32        the row's group-normalised advantage
  old_logp   [B, T-1] f32   log-probs of the targets under the policy that sampled them (computed once per rollout)
  ref_logp   [B, T-1] f32   (only with kl_coef > 0) log-probs under the reference (initial) policy
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bar_jax.model import transformer
from bar_jax.model.config import Compute, ModelConfig


def group_advantages(rewards, group_size: int, eps: float = 1e-6, scale: bool = True) -> np.ndarray:
  """rewards [P * G] (groups contiguous) -> (r - group mean) / (group std + eps); std is the population std.

  A group whose responses all scored the same gets advantage 0: it carries no signal (scale=False: Dr. GRPO's
  unscaled r - mean).
  """
  r = np.asarray(rewards, np.float32).reshape(-1, group_size)
  adv = r - r.mean(axis=1, keepdims=True)
  if scale:
    adv = adv / (r.std(axis=1, keepdims=True) + eps)
  return adv.reshape(-1).astype(np.float32)


def token_logprobs(params, tokens: jax.Array, cfg: ModelConfig, temperature: float = 1.0, mesh=None,
                   compute: Compute = Compute()) -> jax.Array:
  """log pi(tokens[:, t+1] | tokens[:, :t+1]) [B, T-1], from logits / temperature (the sampling distribution)."""
  logits, _ = transformer.forward(params, tokens[:, :-1], cfg, compute=compute, mesh=mesh)
  logits = logits / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def clipped_objective(logp, old_logp, advantages, clip_low: float = 0.2, clip_high: float = 0.2):
  """Per-token PPO surrogate to MINIMISE: -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A).

  Returns (per-token loss [B, T-1], ratio, clipped?) with advantages [B] broadcast over the tokens.
  """
  adv = advantages[:, None]
  ratio = jnp.exp(logp - old_logp)
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
  return -jnp.minimum(unclipped, clipped), ratio, clipped < unclipped


def kl_k3(logp, ref_logp):
  """Per-token KL(pi || ref) estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3: unbiased, >= 0)."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def grpo_loss(cfg: ModelConfig, *, clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.0,
              temperature: float = 1.0, mesh=None, compute: Compute = Compute()) -> Callable:
  """loss_fn(params, batch) -> (loss, metrics) over one rollout micro-batch (see the module docstring)."""

  def loss_fn(params, batch):
    logp = token_logprobs(params, batch["tokens"], cfg, temperature, mesh, compute)
    per_token, ratio, was_clipped = clipped_objective(logp, batch["old_logp"], batch["advantages"],
                                                      clip_low, clip_high)
    w, mask = batch["weights"], batch["resp_mask"]
    n = jnp.maximum(mask.sum(), 1.0)
    metrics = {"pg_loss": (per_token * w).sum(), "tokens": mask.sum(),
               "clip_frac": (was_clipped * mask).sum() / n,
               "ratio_mean": (ratio * mask).sum() / n,
               "approx_kl_old": ((batch["old_logp"] - logp) * mask).sum() / n,
               "neg_logp": -(logp * mask).sum() / n}  # a sampled-entropy estimate
    loss = metrics["pg_loss"]
    if kl_coef:
      kl = kl_k3(logp, batch["ref_logp"])
      metrics["kl_ref"] = (kl * w).sum()
      loss = loss + kl_coef * metrics["kl_ref"]
    return loss, metrics

  return loss_fn


def response_mask(prompt_lens, response_lens, total_len: int) -> np.ndarray:
  """[B, T-1] mask over next-token targets of right-padded prompt + response rows: 1 on the response tokens."""
  mask = np.zeros((len(prompt_lens), total_len - 1), np.float32)
  for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
    mask[i, p - 1:p - 1 + r] = 1.0  # targets tokens[p : p + r] sit at columns p-1 .. p+r-2
  return mask
