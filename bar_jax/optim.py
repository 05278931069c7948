"""optax AdamW with linear warmup + cosine decay and global-norm clipping, over a flat {path: array} trainable dict."""
from __future__ import annotations

import optax


def schedule(lr: float, steps: int, warmup_steps: int = 0, end_lr_frac: float = 0.0, kind: str = "cosine"):
  warmup_steps = min(warmup_steps, max(steps - 1, 0))
  if kind == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
                                [warmup_steps]) if warmup_steps else optax.constant_schedule(lr)
  return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else lr, lr, warmup_steps,
                                            max(steps, warmup_steps + 1), end_value=lr * end_lr_frac)


ROUTER = "layers/moe/router/kernel"


def adamw(opt, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """opt: a ConfigDict with lr, warmup_steps, end_lr_frac, weight_decay, b1, b2, clip_norm, schedule, eps,
  router_lr_mult (the router's learning rate = lr x this; 1 = the same as every other leaf)."""
  sched = schedule(opt.lr, steps, opt.warmup_steps, opt.end_lr_frac, opt.schedule)
  # No decay on norm scales (1-D gains); kernels, embeddings, routers and adapters decay.
  decay_mask = lambda tree: {p: not p.endswith("scale") for p in tree}
  router_mult = float(opt.router_lr_mult)
  tx = optax.chain(
      optax.clip_by_global_norm(opt.clip_norm) if opt.clip_norm else optax.identity(),
      optax.adamw(sched, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                  mask=decay_mask),
      # Adam's step is invariant to a gradient's scale, so a per-leaf learning rate scales the update, not the grad.
      _scale_leaf(ROUTER, router_mult) if router_mult != 1.0 else optax.identity(),
  )
  return tx, sched


def _scale_leaf(path: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the update of the flat trainable dict's `path` leaf by factor (a no-op when it is not trained)."""
  def update(updates, state, params=None):
    del params
    return {p: u * factor if p == path else u for p, u in updates.items()}, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
