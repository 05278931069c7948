"""GRPO: advantages and the clipped loss against plain numpy; a tiny branch learns to emit a rewarded token; the
anchor stays bit-identical; bad verifier output scores 0 and is counted; a killed run resumes bit-identically."""
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bar_jax.evals import verifiers
from bar_jax.model import transformer
from bar_jax.model.config import tiny
from bar_jax import sharding
from bar_jax.stages import rollouts as rl
from bar_jax import pytree
from bar_jax.transforms import grpo
from bar_jax.transforms.upcycle import upcycle
from configs.rl import rl_config
from tests.run_helpers import kill_at_first_checkpoint, one_device_env

DENSE = tiny(vocab_size=259)
TARGET = "a"  # the byte the fixed-token verifier rewards


def _np_logp(logits, targets):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  logz = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
  return np.take_along_axis(logits, targets[..., None], -1)[..., 0] - logz


def test_advantages_match_numpy():
  rewards = np.array([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 1], np.float32)
  got = grpo.group_advantages(rewards, 4, eps=1e-6)
  want = []
  for g in rewards.reshape(3, 4).astype(np.float64):
    want += list((g - g.mean()) / (np.sqrt(((g - g.mean()) ** 2).mean()) + 1e-6))
  # float32 against float64, values of order 1 from 4-term means: a few float32 ulps.
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert np.all(got[4:8] == 0)  # a group that all scored the same carries no signal
  np.testing.assert_allclose(grpo.group_advantages(rewards, 4, scale=False)[:4], [0.5, -0.5, -0.5, 0.5])


def test_clipped_loss_matches_numpy():
  rng = np.random.default_rng(0)
  B, T = 4, 12
  params = transformer.init_params(DENSE, jax.random.key(0))
  tokens = rng.integers(3, 259, (B, T)).astype(np.int32)
  mask = grpo.response_mask([3, 4, 5, 6], [5, 7, 2, 0], T)
  assert mask.sum(1).tolist() == [5, 7, 2, 0] and mask[0, 2:7].all() and not mask[0, 7:].any()
  logits, _ = transformer.forward(params, tokens[:, :-1], DENSE)
  temperature, clip_low, clip_high, kl_coef = 0.7, 0.2, 0.28, 0.05
  logp = _np_logp(np.asarray(logits) / temperature, tokens[:, 1:])
  old = logp + rng.normal(0, 0.3, logp.shape)  # ratios on both sides of both clip edges
  ref = logp + rng.normal(0, 0.3, logp.shape)
  adv = np.array([1.5, -0.7, 0.3, -1.0])
  weights = mask / mask.sum()
  ratio = np.exp(logp - old)
  surrogate = np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - clip_low, 1 + clip_high) * adv[:, None])
  kl = np.exp(ref - logp) - (ref - logp) - 1
  want_pg = -(surrogate * weights).sum()
  want = want_pg + kl_coef * (kl * weights).sum()
  assert ((ratio > 1 + clip_high) & (mask > 0)).any() and ((ratio < 1 - clip_low) & (mask > 0)).any()

  loss_fn = grpo.grpo_loss(DENSE, clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef, temperature=temperature)
  batch = {"tokens": tokens, "resp_mask": mask, "weights": weights.astype(np.float32),
           "advantages": adv.astype(np.float32), "old_logp": old.astype(np.float32),
           "ref_logp": ref.astype(np.float32)}
  loss, metrics = loss_fn(params, batch)
  # float32 log-softmax over V=259 logits, exp of ratios and a weighted sum over B*T=48 tokens against float64:
  # ~V*eps relative per log-prob, so 2e-5 relative (atol for a loss near zero).
  np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["pg_loss"]), want_pg, rtol=2e-5, atol=1e-6)
  clipped = (np.clip(ratio, 1 - clip_low, 1 + clip_high) * adv[:, None] < ratio * adv[:, None])
  # A ratio of token counts: exact up to float32 division.
  np.testing.assert_allclose(float(metrics["clip_frac"]), (clipped * mask).sum() / mask.sum(), rtol=1e-6)


def _fraction_of_target(response: str, reference) -> float:
  return response.count(TARGET) / len(response) if response else 0.0


@pytest.fixture(scope="module")
def branch():
  dense = transformer.init_params(DENSE, jax.random.key(0))
  params, cfg = upcycle(dense, DENSE)
  return jax.tree.map(np.asarray, params), cfg


def _task(byte_tokenizer, verifier=_fraction_of_target):
  prompts = [byte_tokenizer.encode(s) for s in ("hello", "abc", "xyz?", "12")]
  return rl.Task("fixed_token", prompts, [None] * len(prompts), verifier)


def _config(**kw):
  c = rl_config(steps=30, prompts_per_step=4, group_size=8, max_prompt_len=8, max_response_len=8,
                checkpoint_every=10, log_every=10)
  c.opt.lr = 1e-2
  c.update(kw)
  return c


def run_rl(params, cfg, tokenizer, config, workdir, task):
  return rl.run_rl(params, cfg, tokenizer, config, workdir, task=task, mesh=sharding.make_mesh(),
                   identity={"test": "rl"})


def test_grpo_learns_the_rewarded_token_and_keeps_the_anchor(branch, byte_tokenizer, tmp_path):
  params, cfg = branch
  t0 = time.time()
  out, record = run_rl(params, cfg, byte_tokenizer, _config(), str(tmp_path / "run"),
                          task=_task(byte_tokenizer))
  curve = record["reward_curve"]
  assert len(curve) == 30 and np.mean(curve[:3]) < 0.2, curve
  assert np.mean(curve[-3:]) > 0.9, curve
  assert record["rollouts"] == 30 * 32 and record["tokens"] > 0 and record["verifier_failures"]["error"] == 0
  # The anchor (expert 0 and its router column) and nothing else among the frozen: bit-identical.
  before, after = params["layers"]["moe"], jax.tree.map(np.asarray, out["layers"]["moe"])
  for w in ("gate", "up", "down"):
    np.testing.assert_array_equal(after["experts"][w][:, 0], before["experts"][w][:, 0])
    assert not np.array_equal(after["experts"][w][:, 1], before["experts"][w][:, 1])
  np.testing.assert_array_equal(after["router"]["kernel"][..., 0], before["router"]["kernel"][..., 0])
  assert not np.array_equal(np.asarray(out["layers"]["attn"]["q"]["kernel"]), params["layers"]["attn"]["q"]["kernel"])
  print(f"learned in {time.time() - t0:.1f}s: {curve}")


def test_frozen_shared_params_stay_bit_identical(branch, byte_tokenizer, tmp_path):
  """The ablation's partition (shared parameters frozen): only expert 1 and its router column may move."""
  params, cfg = branch
  c = _config(steps=2, trainable=[r"layers/moe/(experts|lora)/.*", r"layers/moe/router/kernel"])
  first_char_early = lambda response, ref: float(bool(response) and response[0] < "m")  # a signal in every group
  out, record = run_rl(params, cfg, byte_tokenizer, c, str(tmp_path / "frozen"),
                          task=_task(byte_tokenizer, first_char_early))
  assert 0 < record["reward_curve"][0] < 1
  flat_in, flat_out = pytree.flatten(params), pytree.flatten(jax.tree.map(np.asarray, out))
  for path, x in flat_in.items():
    if "/moe/" not in path:
      np.testing.assert_array_equal(flat_out[path], x, err_msg=path)
  assert not np.array_equal(flat_out["layers/moe/experts/up"][:, 1], flat_in["layers/moe/experts/up"][:, 1])


def test_bad_verifier_output_scores_zero_and_is_counted(branch, byte_tokenizer, tmp_path):
  calls = []

  def flaky(response, reference):
    calls.append(response)
    kind = len(calls) % 4
    if kind == 0:
      raise ValueError("verifier bug")
    if kind == 1:
      return "not a number"
    if kind == 2:
      time.sleep(60)  # interrupted by the timeout
    return float("nan") if len(calls) % 8 == 3 else 1.0

  # 1 s: far above a returning call's microseconds even on a loaded machine, far below the sleeping one's 60 s.
  rewards, failures = verifiers.score_all(flaky, ["x"] * 8, [None] * 8, timeout_s=1.0)
  assert failures == {"error": 2, "timeout": 2, "invalid": 3}
  assert rewards == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
  calls.clear()
  c = _config(steps=1, verifier_timeout_s=1.0)
  _, record = run_rl(branch[0], branch[1], byte_tokenizer, c, str(tmp_path / "flaky"),
                        task=_task(byte_tokenizer, flaky))
  assert record["verifier_failures"] == {"error": 8, "timeout": 8, "invalid": 12}
  assert record["reward_curve"] == [round(4 / 32, 4)]


KILL_STEPS = 6


def test_kill_9_and_restart_resumes_bit_identical(tmp_path):
  """RL through the one loop: killed with SIGKILL between its first and last checkpoint, started again, it ends with
  the same parameters and reward curve as an uninterrupted run (same program, same devices)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = lambda name: [sys.executable, "-m", "tests.test_rl", str(tmp_path / name), str(tmp_path / f"{name}.npz")]
  # One CPU device and one compilation for the three runs: the claim is about the loop's checkpoints (sharded
  # checkpoints restored across layouts: tests/test_multihost.py).
  env = one_device_env(cache_dir=tmp_path / "jax_cache")
  subprocess.run(cmd("full"), cwd=root, env=env, check=True, capture_output=True)
  proc = subprocess.Popen(cmd("killed"), cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed_at = kill_at_first_checkpoint(proc, str(tmp_path / "killed" / "checkpoints"))
  assert 0 < killed_at < KILL_STEPS, f"kill landed at checkpoint {killed_at} of {KILL_STEPS}"
  assert not (tmp_path / "killed.npz").exists()
  subprocess.run(cmd("killed"), cwd=root, env=env, check=True, capture_output=True)
  full, resumed = np.load(tmp_path / "full.npz"), np.load(tmp_path / "killed.npz")
  assert sorted(full.files) == sorted(resumed.files)
  for name in full.files:
    np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)
  rows = lambda name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]  # noqa: E731
  assert [r["step"] for r in rows("killed")] == list(range(1, KILL_STEPS + 1))
  assert [r["reward_mean"] for r in rows("killed")] == [r["reward_mean"] for r in rows("full")]


def _kill_test_run(workdir: str, out: str) -> None:
  """The kill test's run in its own process: GRPO on the tiny branch, final parameters to OUT (.npz)."""
  from tests.conftest import make_byte_tokenizer
  tok = make_byte_tokenizer()
  params, cfg = upcycle(transformer.init_params(DENSE, jax.random.key(0)), DENSE)
  c = _config(steps=KILL_STEPS, checkpoint_every=1, log_every=1)
  final, _ = run_rl(jax.tree.map(np.asarray, params), cfg, tok, c, workdir, task=_task(tok))
  np.savez(out, **{k.replace("/", "|"): np.asarray(v) for k, v in pytree.flatten(final).items()})


if __name__ == "__main__":
  _kill_test_run(*sys.argv[1:3])
