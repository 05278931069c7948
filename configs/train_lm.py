"""Dense continued training of SmolLM2-135M-Instruct (mid-training on real prose, then SFT on general chat).

  python -m bar_jax.train --config=configs/train_lm.py --workdir=runs/train_lm
  python -m bar_jax.train --config=configs/train_lm.py:tiny --workdir=/tmp/lm   # random tiny model, seconds

Expected: the loss printed in the progress bar falls over the run (general-text NLL ~2.5 -> lower); the workdir
ends as a `dense` artifact (manifest.json, params/, tokenizer.json, metrics.jsonl, tensorboard/). Kill it and run
the same command again: it resumes from the last checkpoint and ends bit-identical.
"""
import ml_collections

from configs.common import compute_config, mesh_config, opt_defaults, parse_arg


def phase(kind: str, mix: dict, steps: int, batch_size: int, seq_len: int, lr: float, max_examples: int = 0):
  return ml_collections.ConfigDict(dict(
      data=dict(kind=kind, mix=mix, seq_len=seq_len, max_examples=max_examples),
      batch_size=batch_size, accum=1, steps=steps, opt=opt_defaults(lr=lr, warmup_steps=min(10, steps // 5)),
      trainable=[r".*"], checkpoint_every=25, log_every=5, z_loss=0.0, lb_loss=0.0, divergence_factor=10.0))


def get_config(arg=None):
  a = parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.stage = "train_lm"
  c.base = "smollm2"
  c.seed = 0
  c.mesh = mesh_config()
  c.keep_checkpoints = False  # True: keep phases/*/checkpoints after the artifact is written
  c.distributed = False
  c.checkpoint_fallback = False  # True: resume from the checkpoint before a damaged latest one (--checkpoint_fallback)
  c.compute = compute_config()
  c.domain_label = "mixed"      # the manifest's `domain` (the baselines name theirs)
  c.phase_order = ["midtrain"]
  c.phases = ml_collections.ConfigDict({"midtrain": phase("lm", {"general": 1.0}, 100, 8, 256, 3e-5)})
  c.eval = ml_collections.ConfigDict(dict(domains=["general"], n_per_domain=32, max_new_tokens=32, batch_size=16))
  if a.tiny:
    c.base = "tiny"
    c.phases.midtrain = phase("lm", {"general": 1.0}, 12, 8, 64, 1e-3, max_examples=200)
    c.phases.midtrain.checkpoint_every = 4
    c.phases.midtrain.log_every = 2
    c.eval.domains = []
  return c
