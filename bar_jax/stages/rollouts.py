"""GRPO with verifiable rewards as a phase of the one training loop: the library behind the rl stage and the branch
stage's rl phase.

Each step: pick `prompts_per_step` training prompts of the capability, sample `group_size` responses to each with
the KV-cache sampler (model/generate.py) from the CURRENT parameters, score them with the capability's reward (its
spec's `reward`, or its metric's score: evals/menu.py; guarded by evals/verifiers.score_all), normalise rewards
within each group into advantages, compute the sampling policy's log-probs once, then take `ppo_epochs` x
`minibatches` optimiser steps of the clipped objective (transforms/grpo.py). The rollouts are loop.train's batch
source (Rollouts) and the GRPO objective its loss, so RL runs the same jitted, sharded, donated step, checkpoints,
metrics and resume as every other phase, over the (trainable, frozen) split of the rl schedule (the anchor's expert
slices and router column stay frozen, bit for bit).

Resume: the prompts and the sampling key of step s are functions of (seed, s) only, so a resumed run replays the same
rollouts from the restored parameters. On one backend with deterministic kernels (the CPU here) it ends
bit-identical to an uninterrupted run; where sampling or reductions are non-deterministic (some GPU kernels) the
replay is exact only up to that noise, which the sampled tokens can amplify.

Not jitted end to end: sampling, scoring (Python verifiers) and the update alternate on the host, as in every GRPO
implementation; the sampler, the log-prob pass and the update are each one compiled program of fixed shape.
The RL settings and their defaults are configs/rl.py's rl_config(); code here reads keys, it sets no defaults.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import numpy as np

from bar_jax import sharding, stage_configs
from bar_jax.errors import BarError
from bar_jax.evals import verifiers
from bar_jax.model import generate as gen
from bar_jax.model import transformer
from bar_jax.model.config import Compute, ModelConfig
from bar_jax.stages import loop
from bar_jax.transforms import freeze, grpo


# ----------------------------------------------------------------------------------------------------------------
# Tasks: prompts (token ids, chat-formatted up to the assistant header), references and the verifier.

@dataclasses.dataclass
class Task:
  name: str
  prompts: list[list[int]]
  references: list[Any]          # what the verifier gets beside each response (a capability task: the item)
  verifier: verifiers.Verifier


def capability_task(config, tokenizer, split: str = "train") -> Task:
  """The RL prompts of config.capability (its items with references) and its reward; references are the items."""
  from bar_jax.data import capability
  cap = capability.get(config.capability)
  items = cap.rl_items(split, groups=list(config.groups) or None)
  rows = []
  for it in items:
    messages = [dict(m) for m in it["messages"]]
    messages[-1]["content"] += config.instruction
    rows.append((tokenizer.render_chat(messages, add_generation_prompt=True)[0], it))
  rows = [r for r in rows if len(r[0]) <= config.max_prompt_len]
  if config.max_prompts:
    rows = rows[:config.max_prompts]
  if not rows:
    raise BarError(f"no {cap.name} {split} prompt fits max_prompt_len={config.max_prompt_len}; raise it")
  return Task(cap.name, [r[0] for r in rows], [r[1] for r in rows], cap.reward_fn)


def evaluate_task(params, cfg: ModelConfig, tokenizer, task: Task, *, n: int, max_new_tokens: int,
                  batch_size: int, compute: Compute = Compute()) -> dict[str, float]:
  """Greedy mean reward on the first n prompts (the domain metric in the RL prompt format, for before/after)."""
  n = min(n, len(task.prompts))
  rewards, failures = [], 0
  for i in range(0, n, batch_size):
    outs = gen.generate(params, cfg, task.prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                        eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, compute=compute)
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    r, f = verifiers.score_all(task.verifier, texts, task.references[i:i + batch_size])
    rewards += r
    failures += sum(f.values())
  return {"score": 100.0 * float(np.mean(rewards)) if rewards else 0.0, "n": n, "verifier_failures": failures}


# ----------------------------------------------------------------------------------------------------------------
# Rollouts.

def rollout(params, cfg: ModelConfig, tokenizer, task: Task, config, step: int,
            compute: Compute = Compute()) -> tuple[dict, dict]:
  """Samples and scores step `step`'s groups: (numpy batch without old_logp, stats). A function of (seed, step)."""
  P, G, R = config.prompts_per_step, config.group_size, config.max_response_len
  rng = np.random.default_rng([config.seed, step])
  idx = rng.choice(len(task.prompts), P, replace=len(task.prompts) < P)
  prompts = [task.prompts[i] for i in idx for _ in range(G)]
  refs = [task.references[i] for i in idx for _ in range(G)]
  key = jax.random.fold_in(jax.random.key(config.seed), step)
  t0 = time.time()
  outs = gen.generate(params, cfg, prompts, max_new_tokens=R, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                      temperature=config.temperature, top_p=config.top_p, key=key, compute=compute)
  gen_s = time.time() - t0
  texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
  rewards, failures = verifiers.score_all(task.verifier, texts, refs, config.verifier_timeout_s)
  adv = grpo.group_advantages(rewards, G, config.adv_eps, config.scale_advantages)
  T = config.max_prompt_len + R
  tokens = np.full((P * G, T), tokenizer.pad_id, np.int32)
  for i, (p, o) in enumerate(zip(prompts, outs)):
    tokens[i, :len(p) + len(o)] = p + o
  plens, rlens = [len(p) for p in prompts], [len(o) for o in outs]
  r = np.asarray(rewards, np.float32).reshape(P, G)
  eos = set(tokenizer.eos_ids)
  stats = {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "reward_max": float(r.max()),
           "groups_without_signal": float((r.std(axis=1) == 0).mean()),
           "response_len": float(np.mean(rlens)),
           "truncated": float(np.mean([not o or o[-1] not in eos for o in outs])),
           "rollout_tokens": float(sum(plens) + sum(rlens)), "response_tokens": float(sum(rlens)),
           "gen_s": gen_s, "gen_tokens_per_s": sum(rlens) / max(gen_s, 1e-9),
           **{f"verifier_{k}": float(v) for k, v in failures.items()}}
  batch = {"tokens": tokens, "resp_mask": grpo.response_mask(plens, rlens, T), "advantages": adv}
  ref = refs[0]["reference"] if isinstance(refs[0], dict) and "reference" in refs[0] else refs[0]  # an item or as is
  return batch, {"stats": stats, "sample": texts[0], "reference": str(ref)}


# ----------------------------------------------------------------------------------------------------------------
# Rollouts as the loop's batch source, GRPO as its loss.

class Rollouts(loop.BatchSource):
  """Step s: rollouts sampled from the current parameters, scored, with the sampling policy's log-probs; split into
  ppo_epochs x minibatches update batches. A function of (seed, s) and the parameters only: no iterator state."""
  data_iter = None

  def __init__(self, cfg: ModelConfig, tokenizer, task: Task, config, mesh, ref_params=None,
               compute: Compute = Compute()):
    self.cfg, self.tokenizer, self.task, self.config, self.mesh, self.ref = cfg, tokenizer, task, config, mesh, \
        ref_params
    self.compute = compute
    self.rows = config.prompts_per_step * config.group_size
    self.micro_rows = self.rows // (config.minibatches * config.accum)
    self.logp_fn = jax.jit(functools.partial(grpo.token_logprobs, cfg=cfg, temperature=config.temperature,
                                             mesh=mesh, compute=compute))
    self.sample = ("", "")

  def logprobs(self, params, tokens):
    """[B, T-1] in micro-batch chunks: the same program shape as the update's micro-batches."""
    chunks = [self.logp_fn(params, sharding.global_batch({"t": tokens[i:i + self.micro_rows]}, self.mesh)["t"])
              for i in range(0, len(tokens), self.micro_rows)]
    return np.concatenate([np.asarray(c) for c in chunks])

  def updates(self, step, current):
    c, B = self.config, self.rows
    params = current()
    t0 = time.time()
    batch, info = rollout(params, self.cfg, self.tokenizer, self.task, c, step, self.compute)
    batch["old_logp"] = self.logprobs(params, batch["tokens"])
    if c.kl_coef:
      batch["ref_logp"] = self.logprobs(self.ref, batch["tokens"])
    del params  # the update donates the trainable leaves `params` may share
    self.sample = (info["sample"], info["reference"])
    mb, out = B // c.minibatches, []
    for epoch in range(c.ppo_epochs):
      order = (np.random.default_rng([c.seed, step, epoch + 1]).permutation(B) if c.ppo_epochs * c.minibatches > 1
               else np.arange(B))
      for m in range(c.minibatches):
        local = {k: v[order[m * mb:(m + 1) * mb]] for k, v in batch.items()}
        local["weights"] = local["resp_mask"] / max(local["resp_mask"].sum(), 1.0) * c.accum
        out.append(local)
    return out, dict(info["stats"], rollout_s=time.time() - t0)


class Console(loop.Hook):
  """One line per logged RL step: reward, loss, response length, time and a sample against its reference."""

  def __init__(self, source: Rollouts, steps: int):
    self.source, self.steps = source, steps

  def log(self, row: dict) -> None:
    if jax.process_index() == 0:
      sample, ref = self.source.sample
      print(f"rl step {row['step']}/{self.steps}: reward {row['reward_mean']:.3f} loss {row['loss']:+.4f} "
            f"len {row['response_len']:.1f} {row['step_time']:.1f}s | {sample[:80]!r} (ref {ref})", flush=True)


def run_rl(params, cfg: ModelConfig, tokenizer, config, workdir: str, *, mesh, identity: dict,
           task: Task | None = None, compute: Compute = Compute(), checkpoint_fallback: bool = False
           ) -> tuple[dict, dict]:
  """GRPO on `params` for config.steps rollout steps through loop.train; resumes from workdir/checkpoints.

  config: a full RL config (configs/rl.py rl_config()). Returns (params, record): the manifest's stage entry with
  steps, rollouts, tokens, FLOPs, the reward curve and verifier failures.
  """
  task = task or capability_task(config, tokenizer)
  B, div = config.prompts_per_step * config.group_size, sharding.batch_divisor(mesh)
  if B % (config.minibatches * config.accum) or (B // (config.minibatches * config.accum)) % div:
    raise BarError(f"rl: prompts_per_step x group_size = {B} rollouts must split into minibatches x accum = "
                   f"{config.minibatches} x {config.accum} micro-batches of a multiple of the mesh's {div} batch "
                   "shards; change them or config.mesh")
  if config.max_prompt_len + config.max_response_len > cfg.max_seq_len:
    raise BarError(f"rl: max_prompt_len + max_response_len = {config.max_prompt_len + config.max_response_len} "
                   f"exceeds the model's max_seq_len {cfg.max_seq_len}; shorten them")
  part = freeze.make_partition(params, cfg, list(config.trainable), tuple(config.frozen_experts))
  n_trainable = freeze.count(freeze.split(params, part)[0])
  source = Rollouts(cfg, tokenizer, task, config, mesh, ref_params=params if config.kl_coef else None,
                    compute=compute)
  loss_fn = grpo.grpo_loss(cfg, clip_low=config.clip_low, clip_high=config.clip_high, kl_coef=config.kl_coef,
                           temperature=config.temperature, mesh=mesh, compute=compute)
  t0 = time.time()
  result = loop.train(params=params, cfg=cfg, part=part, loss_fn=loss_fn, batches=source, opt=config.opt,
                      steps=config.steps, workdir=workdir, mesh=mesh, identity=dict(identity, task=task.name,
                                                                                      n_prompts=len(task.prompts)),
                      accum=config.accum, checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                      desc="rl", updates_per_step=config.ppo_epochs * config.minibatches,
                      hooks=[Console(source, config.steps)], divergence_factor=0.0,
                      checkpoint_fallback=checkpoint_fallback)
  return result.params, _record(config, cfg, task, n_trainable, result.history, time.time() - t0)


def _record(config, cfg: ModelConfig, task: Task, n_trainable: int, history: list[dict], seconds: float) -> dict:
  T = config.max_prompt_len + config.max_response_len
  B = config.prompts_per_step * config.group_size
  rollout_tokens = sum(h["rollout_tokens"] for h in history)
  fwd = 2 * transformer.active_matmul_params(cfg)
  # FLOPs, approximately: sampling (one forward per rollout token) + the old-log-prob pass + the updates (padded).
  flops = (fwd * rollout_tokens + config.steps * B * T * (fwd + config.ppo_epochs * transformer.train_flops_per_token(
      cfg, T)))
  failures = {k: int(sum(h.get(f"verifier_{k}", 0) for h in history)) for k in ("error", "timeout", "invalid")}
  return {
      "stage": "rl", "algorithm": "grpo", "domain": task.name, "steps": config.steps,
      "updates": config.steps * config.ppo_epochs * config.minibatches,
      "rollouts": config.steps * B, "prompts": config.steps * config.prompts_per_step,
      "tokens": float(rollout_tokens), "response_tokens": float(sum(h["response_tokens"] for h in history)),
      "flops": float(flops),
      "reward_curve": [round(h["reward_mean"], 4) for h in history],
      "verifier_failures": failures,
      "trainable": list(config.trainable), "frozen_experts": list(config.frozen_experts),
      "trainable_params": n_trainable,
      "seconds": round(seconds, 1),
      "sec_per_step": float(np.mean([h["step_time"] for h in history])) if history else None,
      "gen_tokens_per_s": float(np.mean([h["gen_tokens_per_s"] for h in history])) if history else None,
      "config": stage_configs.strip_runtime(config.to_dict()),
  }


