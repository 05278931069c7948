"""BTX-style: the dense per-domain fine-tunes become the experts of one MoE (anchor = the base FFN, expert i =
fine-tune i's FFN), shared weights (attention, embeddings, norms) averaged over the fine-tunes (bar_jax/transforms/
baselines.py btx_moe), then the same router-only training as BAR's router step (BTX proper fine-tunes the whole
MoE; router-only keeps the cost equal). The config is part of the built artifact's identity."""
import ml_collections


def get_config(pcfg):
  return ml_collections.ConfigDict(dict(stage="btx", builder="btx_moe", domains=list(pcfg.domains),
                                        rule="average_branches", train_router=True))
