"""One BAR branch: upcycle SmolLM2-135M-Instruct to [anchor | domain expert] and adapt it on one domain.

  python -m bar_jax.train --config=configs/branch.py:math --workdir=runs/branch_math
  python -m bar_jax.train --config=configs/branch.py:tool_use --workdir=runs/branch_tool_use
  python -m bar_jax.train --config=configs/branch.py:math,lora --workdir=runs/branch_math_lora   # adapter expert
  python -m bar_jax.train --config=configs/branch.py:math,tiny --workdir=/tmp/b                  # tests: seconds

arg = "<domain>[,lora][,tiny]" with domain one of math, code, tool_use, safety, or a capability spec file
(configs/capabilities/template.py; `configs/branch.py:path/to/spec.py`), which takes the defaults of no built-in:
SFT only. Phases follow the paper: math and code mid-train then SFT; tool use and safety SFT only;
`--config.phase_order=midtrain,sft,rl` adds GRPO (math).
Trainable sets per phase are `schedule` (the paper's progressive unfreezing); the anchor (expert 0) never trains.
Expected: the manifest's metrics show the domain metric above metrics_before, general NLL within ~5% of before.
"""
import ml_collections

from bar_jax.transforms import freeze
from configs.common import compute_config, mesh_config, opt_defaults, parse_arg
from configs.rl import rl_config

PHASES_BY_DOMAIN = {"math": ["midtrain", "sft"], "code": ["midtrain", "sft"], "tool_use": ["sft"],
                    "safety": ["sft"]}


def phase(kind: str, steps: int, batch_size: int, seq_len: int, lr: float, max_examples: int = 0,
          checkpoint_every: int = 25, log_every: int = 5):
  return ml_collections.ConfigDict(dict(
      data=dict(kind=kind, mix={}, seq_len=seq_len, max_examples=max_examples),
      batch_size=batch_size, accum=1, steps=steps,
      opt=opt_defaults(lr=lr, warmup_steps=max(1, min(10, steps // 10))),
      checkpoint_every=checkpoint_every, log_every=log_every, z_loss=1e-3, lb_loss=0.0,
      divergence_factor=10.0))  # stop when the loss exceeds 10 x its running level (0 = only NaN/Inf stops)


def rl_phase(domain: str, **kw):
  """configs/rl.py's RL settings without the keys the branch sets itself (capability, schedule.rl, frozen_experts,
  seed)."""
  c = rl_config(domain, **kw)
  for key in ("capability", "trainable", "frozen_experts", "seed"):
    del c[key]
  return c


def get_config(arg=None):
  a = parse_arg(arg, positional=["domain"], domain="math", lora=False, tiny=False)
  domain = a.domain
  if domain not in PHASES_BY_DOMAIN and not domain.endswith(".py"):
    raise ValueError(f"config argument domain={domain!r}: use one of {list(PHASES_BY_DOMAIN)} or a capability spec "
                     "file (a path ending in .py)")
  c = ml_collections.ConfigDict()
  c.stage = "branch"
  c.base = "smollm2"
  c.capability = domain        # a built-in name or a spec file
  c.seed = 0
  c.mesh = mesh_config()
  c.keep_checkpoints = False  # True: keep phases/*/checkpoints after the artifact is written
  c.self_contained = False    # False: over a base artifact dir, store only the leaves training changed
  c.distributed = False
  c.checkpoint_fallback = False  # True: resume from the checkpoint before a damaged latest one (--checkpoint_fallback)
  c.compute = compute_config()
  c.expert_kind = "lora" if a.lora else "ffn"
  c.lora_rank = 16
  c.lora_alpha = 32.0
  c.expert_init = ""          # another dense artifact whose FFN seeds the domain expert (the paper: the pre-trained)
  # "random" (OLMo-core default: trunc. normal, std 0.02; the recipe) | "zeros" | "expert_share" (random, then the
  # expert's column offset so the expert starts with router_expert_share of the weight on the branch's data)
  c.router_init = "random"
  c.router_expert_share = 0.9
  c.router_calibration_rows = 8  # packed rows (first phase's seq_len) per domain of its data mix
  c.general_ratio = -1.0      # share of general data in each phase; -1 = the spec's general.weight (built-ins 0.25)
  c.frozen_experts = [0]      # the anchor
  c.schedule = ml_collections.ConfigDict({k: list(v) for k, v in freeze.SCHEDULE.items() if k in
                                          ("midtrain", "sft", "rl")})
  c.phase_order = list(PHASES_BY_DOMAIN.get(domain, ["sft"]))
  lr = 1e-3 if c.expert_kind == "lora" else 2e-4
  c.phases = ml_collections.ConfigDict({
      "midtrain": phase("lm", 40, 8, 256, lr),
      "sft": phase("sft", 80, 8, 256, lr),
      "rl": rl_phase(domain, checkpoint_every=5),
  })
  # domains "auto": the capability and its general set; "" = none; or a comma-separated list of names / spec paths.
  c.eval = ml_collections.ConfigDict(dict(domains="auto", n_per_domain=32, max_new_tokens=48,
                                          batch_size=16, before=True))
  if a.tiny:
    c.base = "tiny"
    c.phases.midtrain = phase("lm", 6, 8, 64, 1e-3, max_examples=64, checkpoint_every=3, log_every=1)
    sft_len = 256 if domain == "tool_use" else 96  # tool-call chats run 148-331 tokens: at 96 every one is dropped
    c.phases.sft = phase("sft", 6, 8, sft_len, 1e-3, max_examples=64, checkpoint_every=3, log_every=1)
    c.phases.rl = rl_phase(domain, steps=2, checkpoint_every=5)
    c.eval = ml_collections.ConfigDict(dict(domains="", n_per_domain=4, max_new_tokens=8, batch_size=4,
                                            before=False))
  return c
