"""GRPO with verifiable rewards on a branch artifact (bar_paper.md §1, RLVR): the branch's math (or tool-use) expert
and all shared parameters train, the anchor (expert 0) stays frozen; no KL term; clip-higher 0.272.

  python -m bar_jax.train --config=configs/rl.py:math --config.model=BRANCH_DIR --workdir=runs/rl_math
  python -m bar_jax.train --config=configs/rl.py:math,frozen --config.model=BRANCH_DIR --workdir=runs/rl_frozen
  python -m bar_jax.train --config=configs/rl.py:tool_use --config.model=BRANCH_DIR --workdir=runs/rl_tool

arg = "<capability>[,frozen]": math (reasoning-gym answers, exact match), tool_use (BFCL, AST match) or a spec file
whose metric or reward scores generated text (configs/capabilities/template.py); `frozen`
trains only the domain expert + router (the FlexOlmo-style ablation whose reward curve the paper found flat).
Expected: a `branch` artifact whose manifest's stages[-1] has steps, rollouts, tokens and reward_curve (one mean
reward per step; it should trend up for math on SmolLM2-135M), metrics {math_before, math_after} (greedy exact
match on eval_n held-out items) and parents -> the input branch. Kill and re-run: it resumes from the last
checkpoint and replays the same rollouts. Settings scaled for the CPU (the paper: 64 prompts x 8 samples, 4096
response tokens, lr 6e-7 at 7B).
"""
import ml_collections

from bar_jax.stages.common import compute_config, mesh_config
from bar_jax.stages.rl import default_config
from bar_jax.transforms import freeze


def get_config(arg="math"):
  parts = (arg or "math").split(",")
  domain, flags = parts[0], set(parts[1:])
  c = ml_collections.ConfigDict()
  c.stage = "rl"
  c.model = ""                 # the input branch artifact directory (required)
  c.seed = 0
  c.mesh = mesh_config()
  c.distributed = False
  c.compute = compute_config()  # ModelConfig compute overrides
  c.rl = default_config(capability=domain, eval_n=64)
  if domain == "tool_use":
    c.rl.instruction = ""
    c.rl.max_prompt_len = 512
    c.rl.max_response_len = 64
  if "frozen" in flags:
    c.rl.trainable = list(freeze.SCHEDULE["midtrain"])  # domain expert + router only
  return c
