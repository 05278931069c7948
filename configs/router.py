"""Router training (BAR stage 3): only the router of a merged MoE trains, on a stratified sample of every domain's SFT.

  python -m bar_jax.train --config=configs/router.py --config.model=runs/moe --workdir=runs/moe_routed
  python -m bar_jax.train --config=configs/router.py:tiny --config.model=/tmp/moe --workdir=/tmp/routed  # tests

The paper's settings: 5% of each domain's SFT data (+ general), 2 epochs, lr 1e-4 with 3% warmup decaying to 0,
z-loss 0.001, no load-balance loss, every expert active (top_k = all). These are the defaults; the lr for SmolLM2 is
to be picked by experiments/sweeps/router_lr.py (1e-4 .. 1e-2). configs/bar_smollm2.py caps the default run's
router at 8 steps (far short of the 2 epochs) to keep that run near an hour on a 2-core CPU.
Steps = ceil(epochs * sampled rows / batch_size); `router.max_steps` caps them for quick runs.
Expected: WORKDIR is an `moe` artifact whose leaf_fingerprints equal the input's for every leaf but
layers/moe/router/kernel; its manifest has parents [input moe], stages [router record: steps, tokens, FLOPs,
seconds, data (domains, fractions, examples per domain) and data_fingerprint], expert_fingerprints per expert slice,
a routing summary; WORKDIR/routing.json and routing.png show per domain and layer which experts its tokens go to
(each domain mostly to its own expert once trained); metrics_before / metrics hold the eval table before and after.
"""
import ml_collections

from configs.common import compute_config, mesh_config, opt_defaults, parse_arg


def get_config(arg=None):
  tiny = parse_arg(arg, tiny=False).tiny
  c = ml_collections.ConfigDict()
  c.stage = "router"
  c.model = ""                  # the moe artifact dir (merge, router or upgrade stage output)
  c.seed = 0
  c.mesh = mesh_config()
  c.distributed = False
  c.keep_checkpoints = False    # True: keep the router phase's checkpoints after the artifact is written
  c.checkpoint_fallback = False  # True: resume from the checkpoint before a damaged latest one (--checkpoint_fallback)
  c.compute = compute_config(dispatch="dense")  # how the run computes (run-time)
  # The routing the router trains under and the written model keeps: top_k=0 = every expert runs (the paper).
  c.moe = ml_collections.ConfigDict(dict(top_k=0, norm_topk=False))
  c.router = ml_collections.ConfigDict(dict(
      domains="",               # "" (empty) = the MoE's expert domains + general (general=True); or "math,code,general"
      general=True,
      fraction=0.05,            # stratified share of each domain's SFT conversations
      max_examples=0,           # cap per domain after sampling (0 = none)
      epochs=2.0,
      max_steps=0,              # 0 = no cap
      batch_size=8, accum=1, seq_len=512, overlong="truncate",
      opt=opt_defaults(lr=1e-4, warmup_steps=0, end_lr_frac=0.0),
      warmup_frac=0.03,         # warmup steps = warmup_frac x the steps (opt.warmup_steps is set from it)
      z_loss=1e-3, lb_loss=0.0, divergence_factor=10.0,
      checkpoint_every=50, log_every=10,
      # Router columns set from data before any step (bar_jax/transforms/router_init.py): "merged" keeps the
      # merge's columns (the recipe), "embed" domain embeddings, "ridge" the closed form, "pair" the merge's
      # columns plus a closed-form term keeping each domain on {anchor, own expert}, "split" a softmax regression
      # onto each branch's own anchor/expert split (experiments/results/routing.md: routes like the oracle at
      # E = 8). epochs=0 then trains
      # nothing. Fitted on init_rows x init_seq_len tokens per domain of the same sample, system prompt masked.
      init="merged", init_rows=16, init_seq_len=256, init_ridge=1e-2, init_max_logit=30.0,
  ))
  # Routing diagnostics: per domain, max_rows packed rows of seq_len held-out tokens (0 rows = skip).
  c.routing = ml_collections.ConfigDict(dict(seq_len=256, max_rows=8, batch_size=8))
  # Eval before and after: "auto" = the expert domains + general, "" = none, or "math,tool_use".
  c.eval = ml_collections.ConfigDict(dict(domains="auto", n_per_domain=16, max_new_tokens=48, batch_size=16,
                                          before=True))
  if tiny:
    c.router.update(fraction=0.05, max_examples=24, max_steps=4, batch_size=8, seq_len=256, overlong="drop",
                    checkpoint_every=2, log_every=1)
    c.router.opt.lr = 1e-2
    c.routing = ml_collections.ConfigDict(dict(seq_len=64, max_rows=2, batch_size=2))
    c.eval = ml_collections.ConfigDict(dict(domains="", n_per_domain=4, max_new_tokens=8, batch_size=4,
                                            before=False))
  return c
