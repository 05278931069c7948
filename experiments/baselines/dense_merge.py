"""Dense weight merging: the uniform average of the four dense per-domain fine-tunes (every leaf, FFN included);
the paper's 36.9 baseline. No training beyond the fine-tunes."""
import ml_collections


def get_config(arg="default"):
  return ml_collections.ConfigDict(dict(variant=arg or "default", sources="dense_domain", rule="average"))
