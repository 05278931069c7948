"""Stage rl: reinforcement learning with verifiable rewards (GRPO) on a branch.

  python -m bar_jax.train --config=configs/rl.py:math --config.model=BRANCH_DIR --workdir=DIR

Each step: pick `prompts_per_step` training prompts of the capability, sample `group_size` responses to each with the
KV-cache sampler (model/generate.py) from the CURRENT parameters, score them with the capability's reward (its spec's
`reward`, or its metric's score: evals/menu.py; guarded by evals/verifiers.score_all), normalise rewards within each group into advantages, compute the sampling policy's log-probs
once, then take `ppo_epochs` x `minibatches` optimiser steps of the clipped objective (transforms/grpo.py). The
update is `loop.make_step`: the same jitted, sharded, donated step over the (trainable, frozen) split as every other
stage, with the rl partition of the unfreezing schedule (all shared parameters; the anchor's expert slices and router
column stay frozen, bit for bit).

Resume: trainable params, optimiser state and the step are checkpointed (orbax) every `checkpoint_every` steps; the
prompts and the sampling key of step s are functions of (seed, s) only, so a resumed run replays the same rollouts
from the restored parameters. On one backend with deterministic kernels (the CPU here) it ends bit-identical to an
uninterrupted run; where sampling or reductions are non-deterministic (some GPU kernels) the replay is exact only up
to that noise, which the sampled tokens can amplify.

Not jitted end to end: sampling, scoring (Python verifiers) and the update alternate on the host, as in every GRPO
implementation; the sampler, the log-prob pass and the update are each one compiled program of fixed shape.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from bar_jax import optim, sharding
from bar_jax.errors import BarError
from bar_jax.evals import verifiers
from bar_jax.io.checkpoint import Checkpointer, check_run_identity
from bar_jax.model import generate as gen
from bar_jax.model import transformer
from bar_jax.model.config import ModelConfig
from bar_jax.stages import loop
from bar_jax.transforms import freeze, grpo

# Prompts are the eval prompts as they are: the math SFT data teaches the closing "The answer is N." (an instruction
# spelling that sentence out was copied verbatim by the 135M model). Set `instruction` to try one anyway.
MATH_INSTRUCTION = ""


def default_config(**kw) -> ml_collections.ConfigDict:
  """The RL phase config (run_rl's `config`); the branch stage embeds one of these as its "rl" phase."""
  c = ml_collections.ConfigDict(dict(
      capability="math",                   # a built-in name or a spec file (configs/capabilities/template.py)
      groups=[],                           # RL prompts from these item groups only; [] = the spec's rl.groups
      instruction=MATH_INSTRUCTION,
      max_prompts=0,                       # 0: every training prompt that fits max_prompt_len
      steps=20, prompts_per_step=4, group_size=8, max_prompt_len=96, max_response_len=48,
      temperature=1.0, top_p=1.0,
      clip_low=0.2, clip_high=0.272,       # asymmetric clip-higher (DAPO; the paper's 0.272); 0.2 = symmetric
      kl_coef=0.0,                         # the paper runs without a KL term (beta = 0)
      adv_eps=1e-6, scale_advantages=True,
      ppo_epochs=1, minibatches=1, accum=1,
      opt=dict(lr=3e-6, warmup_steps=0, end_lr_frac=1.0, weight_decay=0.0, b1=0.9, b2=0.999, clip_norm=1.0,
               schedule="constant"),
      trainable=list(freeze.SCHEDULE["rl"]), frozen_experts=[0],
      seed=0, verifier_timeout_s=2.0, checkpoint_every=10, log_every=1,
      eval_n=0, eval_max_new_tokens=48, eval_batch_size=32,
  ))
  c.update(kw)
  return c


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
                  batch_size: int) -> dict[str, float]:
  """Greedy mean reward on the first n prompts (the domain metric in the RL prompt format, for before/after)."""
  n = min(n, len(task.prompts))
  rewards, failures = [], 0
  for i in range(0, n, batch_size):
    outs = gen.generate(params, cfg, task.prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                        eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    r, f = verifiers.score_all(task.verifier, texts, task.references[i:i + batch_size])
    rewards += r
    failures += sum(f.values())
  return {"score": 100.0 * float(np.mean(rewards)) if rewards else 0.0, "n": n, "verifier_failures": failures}


# ----------------------------------------------------------------------------------------------------------------
# Rollouts.

def rollout(params, cfg: ModelConfig, tokenizer, task: Task, config, step: int) -> tuple[dict, dict]:
  """Samples and scores step `step`'s groups: (numpy batch without old_logp, stats). A function of (seed, step)."""
  P, G, R = config.prompts_per_step, config.group_size, config.max_response_len
  rng = np.random.default_rng([config.seed, step])
  idx = rng.choice(len(task.prompts), P, replace=len(task.prompts) < P)
  prompts = [task.prompts[i] for i in idx for _ in range(G)]
  refs = [task.references[i] for i in idx for _ in range(G)]
  key = jax.random.fold_in(jax.random.key(config.seed), step)
  t0 = time.time()
  outs = gen.generate(params, cfg, prompts, max_new_tokens=R, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                      temperature=config.temperature, top_p=config.top_p, key=key)
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
# The RL loop.

def resolve_config(config, **overrides) -> ml_collections.ConfigDict:
  """default_config() updated with a (partial) phase config and keyword overrides; max_new_tokens is an alias of
  max_response_len. Unknown keys are refused."""
  out = default_config()
  given = dict(config.to_dict() if hasattr(config, "to_dict") else config or {})
  given.update({k: v for k, v in overrides.items() if v is not None})
  if "max_new_tokens" in given:
    given["max_response_len"] = given.pop("max_new_tokens")
  unknown = sorted(set(given) - set(out))
  if unknown:
    raise BarError(f"rl config has unknown keys {unknown}; known keys: {', '.join(sorted(out))}")
  for k, v in given.items():
    if k == "opt":
      out.opt.update(dict(v))
    else:
      out[k] = v
  return out


def run_rl(params, cfg: ModelConfig, tokenizer, config, workdir: str, *, task: Task | None = None, mesh=None,
           input_fingerprint: str | None = None, **overrides) -> tuple[dict, dict]:
  """GRPO on `params` for config.steps rollout steps; resumes from workdir/checkpoints. Returns (params, record).

  config: a full or partial RL config (missing keys from default_config()); overrides (domain, trainable,
  frozen_experts, seed, ...) win over it. `record` is the manifest's stage entry: steps, rollouts, tokens, FLOPs,
  the reward curve and verifier failures.
  """
  config = resolve_config(config, **overrides)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  task = task or capability_task(config, tokenizer)
  B, mb = config.prompts_per_step * config.group_size, None
  micro_rows = B // max(config.minibatches * config.accum, 1)
  if B % (config.minibatches * config.accum) or micro_rows % sharding.batch_divisor(mesh):
    raise BarError(f"rl: prompts_per_step x group_size = {B} rollouts must split into minibatches x accum = "
                   f"{config.minibatches} x {config.accum} micro-batches of a multiple of the mesh's "
                   f"{sharding.batch_divisor(mesh)} batch shards; change them or config.mesh")
  mb = B // config.minibatches
  if config.max_prompt_len + config.max_response_len > cfg.max_seq_len:
    raise BarError(f"rl: max_prompt_len + max_response_len = {config.max_prompt_len + config.max_response_len} "
                   f"exceeds the model's max_seq_len {cfg.max_seq_len}; shorten them")
  part = freeze.make_partition(params, cfg, list(config.trainable), tuple(config.frozen_experts))
  updates_per_step = config.ppo_epochs * config.minibatches
  tx, sched = optim.adamw(config.opt, config.steps * updates_per_step)

  if input_fingerprint is None:
    from bar_jax.io import artifact
    input_fingerprint = artifact.fingerprint(params)

  trainable, frozen, opt_state = loop.init_state(params, cfg, part, tx, mesh)  # exactly loop.train's placement
  n_trainable = freeze.count(trainable)
  ref_params = params if config.kl_coef else None  # the input policy (also after a resume)
  del params  # memory: only the split copies stay alive
  identity = {"stage": "rl", "input": input_fingerprint, "model": cfg.to_dict(), "rl_config": config.to_dict(),
              "task": task.name, "n_prompts": len(task.prompts), "mesh": dict(mesh.shape)}
  check_run_identity(workdir, identity)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  start = ckpt.latest_step() or 0
  if start:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            {"trainable": trainable, "opt_state": opt_state, "step": loop.step_array(0, mesh)})
    state = ckpt.restore(start, abstract)
    trainable, opt_state = state["trainable"], state["opt_state"]
  history_path = os.path.join(workdir, "metrics.jsonl")
  history = loop.read_history(history_path, upto=start)
  writer = loop.MetricsWriter(workdir, history_path, history) if jax.process_index() == 0 else None

  keep = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  loss_fn = grpo.grpo_loss(cfg, clip_low=config.clip_low, clip_high=config.clip_high, kl_coef=config.kl_coef,
                           temperature=config.temperature, mesh=mesh)
  step_fn = jax.jit(loop.make_step(loss_fn, tx, part, config.accum), donate_argnums=(0, 1),
                    out_shardings=(keep(trainable), keep(opt_state), None))
  join_fn = jax.jit(functools.partial(freeze.join, part=part))
  logp_fn = jax.jit(functools.partial(grpo.token_logprobs, cfg=cfg, temperature=config.temperature, mesh=mesh))

  def logprobs(p, tokens):
    """[B, T-1] in micro-batch chunks: the same program shape as the update's micro-batches."""
    chunks = [logp_fn(p, sharding.global_batch({"t": tokens[i:i + micro_rows]}, mesh)["t"])
              for i in range(0, len(tokens), micro_rows)]
    return np.concatenate([np.asarray(c) for c in chunks])

  t_start = time.time()
  for step in range(start, config.steps):
    t0 = time.time()
    current = join_fn(trainable, frozen)
    batch, info = rollout(current, cfg, tokenizer, task, config, step)
    batch["old_logp"] = logprobs(current, batch["tokens"])
    if config.kl_coef:
      batch["ref_logp"] = logprobs(ref_params, batch["tokens"])
    del current
    t1 = time.time()
    outs = []
    for epoch in range(config.ppo_epochs):
      order = (np.random.default_rng([config.seed, step, epoch + 1]).permutation(B) if updates_per_step > 1
               else np.arange(B))
      for m in range(config.minibatches):
        rows = order[m * mb:(m + 1) * mb]
        local = {k: v[rows] for k, v in batch.items()}
        local["weights"] = local["resp_mask"] / max(local["resp_mask"].sum(), 1.0) * config.accum
        glob = sharding.global_batch(loop.to_micro(local, config.accum), mesh, batch_axis=1)
        trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, glob)
        outs.append(metrics)
    update_metrics = {k: float(np.mean([float(o[k]) for o in outs])) for k in outs[0]}
    update_metrics.pop("tokens", None)
    now = time.time()
    row = dict(step=step + 1, **info["stats"], **update_metrics, lr=float(sched((step + 1) * updates_per_step - 1)),
               update_s=now - t1, step_s=now - t0)
    history.append(row)
    if writer:
      writer.write(row)
    if (step + 1) % config.log_every == 0 and jax.process_index() == 0:
      print(f"rl step {step + 1}/{config.steps}: reward {row['reward_mean']:.3f} loss {row['loss']:+.4f} "
            f"len {row['response_len']:.1f} {row['step_s']:.1f}s | {info['sample'][:80]!r} (ref {info['reference']})",
            flush=True)
    done = step + 1
    if done % config.checkpoint_every == 0 or done == config.steps:
      ckpt.save(done, {"trainable": trainable, "opt_state": opt_state, "step": loop.step_array(done, mesh)})
  ckpt.close()
  if writer:
    writer.close()
  final = freeze.join(trainable, frozen, part)
  return final, _record(config, cfg, task, n_trainable, history, time.time() - t_start, start)


def _record(config, cfg: ModelConfig, task: Task, n_trainable: int, history: list[dict], seconds: float,
            start: int) -> dict:
  T = config.max_prompt_len + config.max_response_len
  B = config.prompts_per_step * config.group_size
  rollout_tokens = sum(h["rollout_tokens"] for h in history)
  fwd = 2 * transformer.active_matmul_params(cfg)
  # FLOPs, approximately: sampling (one forward per rollout token) + the old-log-prob pass + the updates (padded).
  flops = (fwd * rollout_tokens + config.steps * B * T * (fwd + config.ppo_epochs * transformer.train_flops_per_token(
      cfg, T)))
  failures = {k: int(sum(h.get(f"verifier_{k}", 0) for h in history)) for k in ("error", "timeout", "invalid")}
  timed = history[start:] if len(history) > start else history
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
      "sec_per_step": float(np.mean([h["step_s"] for h in timed])) if timed else None,
      "gen_tokens_per_s": float(np.mean([h["gen_tokens_per_s"] for h in timed])) if timed else None,
      "config": config.to_dict(),
  }


# ----------------------------------------------------------------------------------------------------------------
# The stage.

def run(config, workdir: str) -> str:
  from bar_jax.stages import common
  if common.done(workdir):
    return workdir
  if not config.get("model", None):
    raise BarError("rl needs an input branch: pass --config.model=BRANCH_DIR (an artifact written by the branch stage)")
  model = common.load_model(config.model)
  if model.cfg.ffn != "moe":
    raise BarError(f"{config.model} is a {model.manifest.get('kind', 'dense')} model; RL runs on a branch "
                   "(upcycle it with the branch stage first)")
  cfg = common.model_overrides(model.cfg, config.get("compute", None))
  mesh = common.mesh_from(config)
  rl_config = resolve_config(config.rl)
  metrics = {}
  eval_task = capability_task(rl_config, model.tokenizer, split="eval") if rl_config.eval_n else None
  ev = dict(n=rl_config.eval_n, max_new_tokens=rl_config.eval_max_new_tokens, batch_size=rl_config.eval_batch_size)
  if eval_task:
    metrics[f"{eval_task.name}_before"] = evaluate_task(model.params, cfg, model.tokenizer, eval_task, **ev)
  params, record = run_rl(model.params, cfg, model.tokenizer, rl_config, os.path.join(workdir, "rl"), mesh=mesh,
                          input_fingerprint=model.manifest.get("fingerprint"))
  if eval_task:
    metrics[f"{eval_task.name}_after"] = evaluate_task(params, cfg, model.tokenizer, eval_task, **ev)
  record["metrics"] = metrics
  parent = dict(model.manifest, role="parent")
  return common.write_artifact(workdir, model, params, cfg, "branch", [record], [parent], metrics=metrics,
                               base_fingerprint=model.manifest.get("base_fingerprint", model.manifest.get("fingerprint")),
                               domain=model.manifest.get("domain", rl_config.capability))
