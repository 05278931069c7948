"""Dense weight merging: the uniform average of the dense per-domain fine-tunes (every leaf, FFN included; the
builder is bar_jax/transforms/baselines.py average_dense); the paper's 36.9 baseline. No training beyond the
fine-tunes. The config is part of the built artifact's identity."""
import ml_collections


def get_config(pcfg):
  return ml_collections.ConfigDict(dict(stage="dense_merge", builder="average_dense", domains=list(pcfg.domains)))
