"""Guards against silent failure: training numbers checked as they come (settings are checked before any work by
their stage's typed schema, bar_jax/stage_configs.py).

Pure functions of plain values (no I/O, no jax), so every rule is testable in microseconds:
  LossGuard.check(row)     a non-finite loss or gradient norm, or a loss far above its running level, stops training
Each failure is a BarError: one line naming the step, the bad value and what to change.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from bar_jax.errors import BarError

# ----------------------------------------------------------------------------------------------------------------
# Training numbers.

class LossGuard:
  """Stops training on a non-finite loss or gradient norm, or a loss above `factor` x its running level.

  The running level is an exponential moving average of the finite losses seen so far (weight `decay` on the old
  level); it starts after `warmup` rows, since the first losses of a run move fast. A loss 10x its level is far
  outside a healthy run's noise (an LM's loss starts near ln(vocab) and falls), and within a few steps of a real
  divergence (an lr 1e4x too large reaches 1e9).
  """

  def __init__(self, factor: float = 10.0, warmup: int = 3, decay: float = 0.9):
    self.factor, self.warmup, self.decay = float(factor), int(warmup), float(decay)
    self.level: float | None = None
    self.seen = 0

  def check(self, row: Mapping[str, Any], where: str = "training") -> None:
    step = row.get("step", "?")
    for key in ("loss", "grad_norm"):
      v = row.get(key)
      if v is not None and not math.isfinite(float(v)):
        raise BarError(f"{where}: {key} is {float(v)} at step {step}; nothing from this step was saved (the last "
                       f"good checkpoint is kept): lower the learning rate (opt.lr) or check the data and the "
                       f"checkpoint it resumed from, then re-run in a fresh --workdir")
    loss = row.get("loss")
    if loss is None:
      return
    loss = float(loss)
    if self.factor and self.level is not None and self.seen >= self.warmup and loss > self.factor * self.level:
      raise BarError(f"{where}: loss {loss:.4g} at step {step} is over {self.factor:g}x its running level "
                     f"{self.level:.4g} (diverging); the last good checkpoint is kept: lower the learning rate "
                     f"(opt.lr) and re-run in a fresh --workdir, or raise divergence_factor if this is expected")
    self.level = loss if self.level is None else self.decay * self.level + (1 - self.decay) * loss
    self.seen += 1


def json_safe(row: Mapping[str, Any]) -> dict[str, Any]:
  """A metrics row that json.dumps writes as valid JSON: non-finite floats become null (bare NaN is not JSON)."""
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
