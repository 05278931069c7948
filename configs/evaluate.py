"""Every domain's headline metric on one or more models, side by side (the paper's table).

  python -m bar_jax.train --config=configs/evaluate.py --config.model=smollm2 --workdir=runs/eval_base
  python -m bar_jax.train --config=configs/evaluate.py --config.model=runs/math,runs/moe --workdir=runs/eval_cmp
  # larger runs: --config.n_per_domain=200 --config.max_new_tokens=256

Expected: WORKDIR/eval.json (per model and domain: value, score, counts, a few sample responses) and WORKDIR/eval.md,
a markdown table (rows = models; columns = math, code, tool_use, safety, general; overall = mean of the domain
scores, NLL domains as 100*exp(-nll)). The default (16 items per domain, 48 new tokens) is a quick check that takes
a few minutes for SmolLM2-135M on a 2-core CPU; its numbers carry a +-10 point sampling error.
"""
import ml_collections

from configs.common import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, positional=["model"], model="smollm2")
  c = ml_collections.ConfigDict()
  c.stage = "evaluate"
  c.model = a.model             # comma-separated artifact dirs, or "smollm2" (the packaged base GGUF)
  c.domains = "all"             # or e.g. "math,tool_use"
  c.n_per_domain = 16           # held-out items per domain (the first n: stratified across sub-sources)
  c.max_new_tokens = 48         # generation budget (math, tool_use, safety)
  c.batch_size = 16             # prompts per generate call
  c.max_prompt_tokens = 256     # longer prompts (long BFCL schemas) are passed over and counted
  c.nll_seq_len = 256           # NLL rows (code bodies, prose passages, packed): longer ones truncated and counted
  c.nll_batch_rows = 4          # rows per NLL forward
  c.compute = ml_collections.ConfigDict({"dtype": "float32"})  # compute knobs for ModelConfig
  return c
