"""The pipeline's progress: how long each step should take and how long is left, from step budgets and the rates
measured so far on this machine. (A training phase's own progress bar is stages/loop.py `Progress`, a hook of the
loop.)

  Clock(config)                  estimates per pipeline step: observe(step, seconds, workdir) after each, estimate(step)
  matmul_flops_per_second()      this machine's fp32 matmul rate on one device (what the first estimates scale by)
  duration(seconds)              "42 s" or "3.5 min", as the pipeline prints them
"""
from __future__ import annotations

import json
import os
import time

from bar_jax.io import workdir as workdir_lib
from bar_jax.model.config import ModelConfig


def matmul_flops_per_second(n: int = 1024, repeats: int = 5) -> float:
  """This machine's fp32 matmul rate on one device: the best of a few n x n products after a warm-up (~1 s)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


class Clock:
  """How long each step should take, from this machine and this run. A step is a stages/pipeline.py `Step` (its
  kind, name, outdir, train_steps and tokens_per_step are read).

  Until a training step has finished, its seconds per token are the model FLOPs per token of the step's model (the
  base with 2 experts for a branch, N + 1 for the router) over this machine's measured matmul rate times
  config.estimate.fraction_of_peak; afterwards, the rate the finished steps measured. An evaluation is first
  config.estimate.eval_seconds_per_model (timed on a machine of config.estimate.reference_gflops) scaled by this
  machine's rate, afterwards the time the last evaluation took.
  """

  def __init__(self, config):
    self.estimate_config = config.estimate
    self.n_experts = len(config.domains) + 1
    self.flops = None              # matmul FLOP/s, measured when the base's shape is known
    self.base_cfg = None
    self.sec_per_token = None      # measured by a finished training step
    self.eval_seconds = None       # measured by a finished evaluation
    self.other_seconds = float(config.estimate.other_seconds)

  def calibrate(self, base_dir: str) -> None:
    """Reads the base's shape from its manifest and measures the matmul rate (once)."""
    m = _manifest(base_dir)
    if self.flops is None and m.get("model"):
      self.base_cfg = ModelConfig.from_dict(m["model"])
      self.flops = matmul_flops_per_second()
      print(f"[pipeline] this machine: {self.flops / 1e9:.0f} GFLOP/s fp32 matmul on one device; first estimates "
            f"assume {float(self.estimate_config.fraction_of_peak):.0%} of it until a step measures its own rate",
            flush=True)

  def observe(self, step, seconds: float, workdir: str) -> None:
    if step.kind == "base":
      self.calibrate(step.outdir)
    elif step.kind in ("branch", "router") and step.train_steps:
      m = _manifest(os.path.join(workdir, step.name))
      train_s = sum(s.get("seconds", 0) or 0 for s in m.get("stages", []))
      tokens = sum(s.get("tokens", 0) or 0 for s in m.get("stages", []))
      if train_s and tokens:
        self.sec_per_token = train_s / tokens
    elif step.kind == "eval":
      self.eval_seconds = seconds

  def known(self) -> bool:
    return self.flops is not None or self.sec_per_token is not None

  def _flops_per_token(self, step) -> float:
    from bar_jax.model import transformer
    e = 2 if step.kind == "branch" else self.n_experts
    seq = int(step.tokens_per_step or 256)
    return transformer.train_flops_per_token(self.base_cfg.replace(ffn="moe", n_experts=e, top_k=0), seq)

  def estimate(self, step) -> float:
    e = self.estimate_config
    if step.kind == "eval":
      if self.eval_seconds is not None:
        return self.eval_seconds
      return float(e.eval_seconds_per_model) * float(e.reference_gflops) * 1e9 / self.flops
    if not step.train_steps:
      return self.other_seconds
    if self.sec_per_token is not None:
      rate = self.sec_per_token
    else:
      rate = self._flops_per_token(step) / (self.flops * float(e.fraction_of_peak))
    return step.train_steps * step.tokens_per_step * rate + self.other_seconds


def _manifest(d: str) -> dict:
  try:
    with open(os.path.join(d, workdir_lib.MANIFEST)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def duration(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
