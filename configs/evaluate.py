"""Every domain's headline metric on one or more models, side by side (the paper's table).

  python -m bar_jax.train --config=configs/evaluate.py --config.model=smollm2 --workdir=runs/eval_base
  python -m bar_jax.train --config=configs/evaluate.py --config.model=runs/math,runs/moe --workdir=runs/eval_cmp
  # a quick look: --config.n_per_domain=16 (intervals ~ +-20 points)

Expected: WORKDIR/eval.json (per model and domain: value, 95% interval, counts, budgets, every item's outcome and
reply) and WORKDIR/eval.md, a markdown table (rows = models; columns = math, code, tool_use, safety, general,
instruction_following; percentages with 95% intervals; code and general as per-token NLL with the change vs the
first row; overall = mean of the percentage columns; * = differs from the first row at p < 0.05, paired over the
same items). Sizes and budgets come from the data (bar_jax/evals/runner.py): up to 200 held-out items per kind,
stratified.
"""
import ml_collections

from bar_jax.evals import protocol
from configs.common import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, positional=["model"], model="smollm2")
  c = ml_collections.ConfigDict()
  c.stage = "evaluate"
  c.model = a.model             # artifact dirs (comma-separated), or "smollm2" (the packaged base GGUF)
  c.domains = "all"             # or e.g. "math,tool_use" (a list in the typed config)
  c.n_per_domain = 200          # held-out items per kind (safety: harmful and benign each), stratified
  c.max_new_tokens = 256        # upper limit of the answer budget (the 95th percentile of the domain's answers)
  # rows decoding at once (fewer for long prompts: model/generate.py CACHE_BYTES): decoding multiplies [batch, d]
  # by every weight each step, and a CPU's matmul rate grows with the batch (measure it:
  # python experiments/bench_train.py --sections=peak,decode --decode_batches=16,64 --decode_experts=1,5)
  c.batch_size = 64
  c.max_prompt_tokens = 0       # 0: the 95th percentile of the domain's prompts; longer ones passed over and counted
  c.nll_seq_len = 512           # NLL rows (code bodies, prose passages, packed): longer ones truncated and counted
  c.nll_batch_rows = 4          # rows per NLL forward
  c.compute = ml_collections.ConfigDict({"dtype": "float32"})  # how the run computes (bar_jax/model/config.py Compute)
  # The routing the models are evaluated with: None keeps each model's own; e.g. --config.moe.top_k=2 keeps the two
  # largest router weights of every token (norm_topk: renormalise them).
  c.moe = ml_collections.ConfigDict({"top_k": ml_collections.FieldReference(None, field_type=int),
                                     "norm_topk": ml_collections.FieldReference(None, field_type=bool)})
  # Drift NLL (bar_jax/evals/drift.py): the base's own greedy replies to IFBench prompts, made once per base and
  # stored as drift_dir/drift_<base fingerprint>.json, scored on every model as the domain "drift". "" = off;
  # else the base (an artifact dir or "smollm2"). drift_dir "" = WORKDIR/../drift (shared by a pipeline's evals).
  c.drift_base = ""
  c.drift_n = 128
  c.drift_tokens = 128
  c.drift_dir = ""
  # Each model's per-domain results, keyed by everything that decides them ("" = WORKDIR/../eval_cache): a re-run
  # on more domains scores only the new ones.
  c.cache_dir = ""
  c.protocol = protocol.VERSION  # in the identity: an evaluation of another protocol is redone, never reused
  return c
