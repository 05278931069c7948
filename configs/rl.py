"""GRPO with verifiable rewards on a branch artifact (RLVR, the paper's RL phase): the branch's math (or tool-use)
expert and all shared parameters train, the anchor (expert 0) stays frozen; no KL term; clip-higher 0.272.

  python -m bar_jax.train --config=configs/rl.py:math --config.model=BRANCH_DIR --workdir=runs/rl_math
  python -m bar_jax.train --config=configs/rl.py:math,frozen --config.model=BRANCH_DIR --workdir=runs/rl_frozen
  python -m bar_jax.train --config=configs/rl.py:tool_use --config.model=BRANCH_DIR --workdir=runs/rl_tool

arg = "<domain>[,frozen]": domain math (reasoning-gym answers, exact match) or tool_use (BFCL, AST match); `frozen`
trains only the domain expert + router (the FlexOlmo-style ablation whose reward curve the paper found flat).
Expected: a `branch` artifact whose manifest's stages[-1] has steps, rollouts, tokens and reward_curve (one mean
reward per step; it should trend up for math on SmolLM2-135M), metrics {math_before, math_after} (greedy exact
match on eval_n held-out items) and parents -> the input branch. Kill and re-run: it resumes from the last
checkpoint and replays the same rollouts. Settings scaled for the CPU (the paper: 64 prompts x 8 samples, 4096
response tokens, lr 6e-7 at 7B).
"""
import ml_collections

from configs.common import compute_config, mesh_config, opt_defaults, parse_arg
from bar_jax.transforms import freeze


def rl_config(domain: str = "math", **kw) -> ml_collections.ConfigDict:
  """The RL settings: this stage's config.rl and the branch stage's phases.rl (one set of defaults for both)."""
  c = ml_collections.ConfigDict(dict(
      capability=domain,                   # a built-in name or a spec file (configs/capabilities/template.py)
      groups=[],                           # RL prompts from these item groups only; [] = the spec's rl.groups
      instruction="",                      # appended to each math question ("" : the SFT data teaches the format)
      max_prompts=0,                       # 0: every training prompt that fits max_prompt_len
      steps=20, prompts_per_step=4, group_size=8, max_prompt_len=96, max_response_len=48,
      temperature=1.0, top_p=1.0,
      clip_low=0.2, clip_high=0.272,       # asymmetric clip-higher (DAPO; the paper's 0.272); 0.2 = symmetric
      kl_coef=0.0,                         # the paper runs without a KL term (beta = 0)
      adv_eps=1e-6, scale_advantages=True,
      ppo_epochs=1, minibatches=1, accum=1,
      opt=opt_defaults(lr=3e-6, warmup_steps=0, end_lr_frac=1.0, b2=0.999, schedule="constant"),
      trainable=list(freeze.SCHEDULE["rl"]), frozen_experts=[0],
      seed=0, verifier_timeout_s=2.0, checkpoint_every=10, log_every=1,
      eval_n=0, eval_max_new_tokens=48, eval_batch_size=32,
  ))
  if domain == "tool_use":
    c.update(max_prompt_len=512, max_response_len=64)
  c.update(kw)
  return c


def get_config(arg=None):
  a = parse_arg(arg, positional=["domain"], choices={"domain": ("math", "tool_use")}, domain="math", frozen=False)
  c = ml_collections.ConfigDict()
  c.stage = "rl"
  c.model = ""                 # the input branch artifact directory (required)
  c.mesh = mesh_config()
  c.distributed = False
  c.compute = compute_config()  # run-time ModelConfig knobs
  c.keep_checkpoints = False   # True: keep rl/checkpoints after the artifact is written
  c.checkpoint_fallback = False  # True: resume from the checkpoint before a damaged latest one (--checkpoint_fallback)
  c.rl = rl_config(a.domain, eval_n=64)
  if a.frozen:
    c.rl.trainable = list(freeze.SCHEDULE["midtrain"])  # domain expert + router only
  return c
