"""One BAR branch: upcycle SmolLM2-135M-Instruct to [anchor | capability expert] and adapt it on one capability.

  python -m bar_jax.train --config=configs/branch.py:math --workdir=runs/branch_math
  python -m bar_jax.train --config=configs/branch.py:tool_use --workdir=runs/branch_tool_use
  python -m bar_jax.train --config=configs/branch.py:math,lora --workdir=runs/branch_math_lora   # adapter expert
  python -m bar_jax.train --config=configs/branch.py:math,tiny --workdir=/tmp/b                  # tests: seconds
  python -m bar_jax.train --config=configs/branch.py --config.capability=path/to/my_spec.py --workdir=runs/b_mine

arg = "<capability>[,lora][,tiny]" with capability a built-in (math, code, tool_use, safety) or a spec file
(configs/capabilities/template.py); --config.capability overrides it. Phases follow the paper: math and
code mid-train then SFT; tool use and safety SFT only; `--config.phase_order=midtrain,sft,rl` adds GRPO (math).
Trainable sets per phase are `schedule` (the paper's progressive unfreezing); the anchor (expert 0) never trains.
Expected: the manifest's metrics show the domain metric above metrics_before, general NLL within ~5% of before.
"""
import ml_collections

from bar_jax.stages.common import compute_config, mesh_config, opt_defaults
from bar_jax.transforms import freeze

PHASES_BY_DOMAIN = {"math": ["midtrain", "sft"], "code": ["midtrain", "sft"], "tool_use": ["sft"],
                    "safety": ["sft"]}


def phase(kind: str, steps: int, batch_size: int, seq_len: int, lr: float, max_examples: int = 0,
          checkpoint_every: int = 25, log_every: int = 5):
  return ml_collections.ConfigDict(dict(
      data=dict(kind=kind, mix={}, seq_len=seq_len, max_examples=max_examples),
      batch_size=batch_size, accum=1, steps=steps,
      opt=opt_defaults(lr=lr, warmup_steps=max(1, min(10, steps // 10))),
      checkpoint_every=checkpoint_every, log_every=log_every, z_loss=1e-3, lb_loss=0.0))


def rl_phase(steps: int = 20):
  return ml_collections.ConfigDict(dict(
      steps=steps, prompts_per_step=4, group_size=4, max_new_tokens=48, temperature=1.0, top_p=1.0,
      opt=opt_defaults(lr=2e-6, warmup_steps=0, schedule="constant", clip_norm=1.0),
      clip_low=0.2, clip_high=0.272, kl_coef=0.0, ppo_epochs=1, checkpoint_every=5, log_every=1))


def get_config(arg="math"):
  parts = (arg or "math").split(",")
  domain, flags = parts[0], set(parts[1:])
  c = ml_collections.ConfigDict()
  c.stage = "branch"
  c.base = "smollm2"
  c.capability = domain        # a built-in name or a spec file path
  c.seed = 0
  c.mesh = mesh_config()
  c.distributed = False
  c.compute = compute_config()
  c.expert_kind = "lora" if "lora" in flags else "ffn"
  c.lora_rank = 16
  c.lora_alpha = 32.0
  c.expert_init = ""          # another dense artifact whose FFN seeds the domain expert (the paper: the pre-trained)
  c.router_init = "zeros"     # "zeros" | "random"
  c.general_ratio = -1.0      # share of general data in each phase; -1 = the spec's general.weight (built-ins 0.25)
  c.frozen_experts = [0]      # the anchor
  c.schedule = ml_collections.ConfigDict({k: list(v) for k, v in freeze.SCHEDULE.items() if k in
                                          ("midtrain", "sft", "rl")})
  c.phase_order = list(PHASES_BY_DOMAIN.get(domain, ["sft"]))
  lr = 1e-3 if c.expert_kind == "lora" else 2e-4
  c.phases = ml_collections.ConfigDict({
      "midtrain": phase("lm", 40, 8, 256, lr),
      "sft": phase("sft", 80, 8, 256, lr),
      "rl": rl_phase(),
  })
  # domains "auto": the capability and its general set; or a comma-separated list of names / spec paths.
  c.eval = ml_collections.ConfigDict(dict(domains="auto", n_per_domain=32, max_new_tokens=48,
                                          batch_size=16, before=True))
  if "tiny" in flags:
    c.base = "tiny"
    c.phases.midtrain = phase("lm", 6, 8, 64, 1e-3, max_examples=64, checkpoint_every=3, log_every=1)
    c.phases.sft = phase("sft", 6, 8, 96, 1e-3, max_examples=64, checkpoint_every=3, log_every=1)
    c.phases.rl = rl_phase(steps=2)
    c.eval = ml_collections.ConfigDict(dict(domains="", n_per_domain=4, max_new_tokens=8, batch_size=4,
                                            before=False))
  return c
