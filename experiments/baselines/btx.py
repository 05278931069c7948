"""BTX-style: the four dense per-domain fine-tunes become the experts of one MoE (anchor = the base FFN, expert i =
fine-tune i's FFN), shared weights (attention, embeddings, norms) averaged over the fine-tunes, then the same
router-only training as BAR's router step (BTX proper fine-tunes the whole MoE; router-only keeps the cost equal)."""
import ml_collections


def get_config(arg="default"):
  return ml_collections.ConfigDict(dict(variant=arg or "default", sources="dense_domain", rule="average",
                                        train_router=True))
