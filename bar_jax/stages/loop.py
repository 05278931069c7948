"""The one training loop: a jitted step over a (trainable, frozen) split, sharded, checkpointed, resumable.

Every stage that trains (dense LM, branch mid-training/SFT, router, upgrade, RL) calls `train(...)` with its own loss
function, partition and batch source (an iterator of batches, or RL's rollouts sampled from the current parameters),
plus hooks (metrics and TensorBoard, progress, periodic eval). Frozen leaves are arguments of the step but never
reach the optimiser; trainable leaves and the optimiser state are donated. A run killed at any point and started
again with the same command resumes from the last checkpoint (params, optimiser state, step, data iterator) and ends
bit-identical to an uninterrupted run. SIGTERM (a preempted pod slice, a SLURM job at its time limit) stops the run
at the next step boundary with a checkpoint of that step, and raises errors.Preempted (the CLI exits 75).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bar_jax import guards, optim, pytree, sharding, stage_configs
from bar_jax.errors import Preempted
from bar_jax.io import workdir as workdir_lib
from bar_jax.io.checkpoint import Checkpointer
from bar_jax.model import loss as loss_lib, transformer
from bar_jax.model.config import Compute, ModelConfig
from bar_jax.transforms import freeze

LossFn = Callable[[dict, dict], tuple[jax.Array, dict[str, jax.Array]]]


# ----------------------------------------------------------------------------------------------------------------
# Losses.

def lm_loss(cfg: ModelConfig, mesh=None, z_loss: float = 0.0, lb_loss: float = 0.0,
            compute: Compute = Compute(), ce_chunk: int = 0) -> LossFn:
  """Next-token cross-entropy over batch["mask"] (assistant tokens for SFT), plus the MoE router losses.

  The head and cross-entropy run over slices of ce_chunk positions (0: loss.auto_chunk, which keeps a whole row
  when its logits are small), so a 100k vocabulary never holds [B, T, V] logits (bar_jax/model/loss.py).
  """

  def loss_fn(params, batch):
    hidden, aux = transformer.forward(params, batch["inputs"], cfg, compute=compute, positions=batch["positions"],
                                      segment_ids=batch["segment_ids"], mesh=mesh, return_hidden=True)
    mask = batch["mask"].astype(jnp.float32)
    ce = loss_lib.token_cross_entropy(hidden, loss_lib.head_kernel(params, cfg), batch["targets"], ce_chunk)
    n = jnp.maximum(mask.sum(), 1.0)
    nll = (ce * mask).sum() / n
    metrics = {"nll": nll, "tokens": mask.sum()}
    loss = nll
    if aux:
      # Router z-loss as OLMo-core reduces it: each layer's sum of lse^2 over every position / the batch's loss tokens,
      # summed over layers (aux["z_loss"] is each layer's mean over the B*T positions).
      metrics["z_loss"] = aux["z_loss"].sum() * (mask.size / n)
      metrics["lb_loss"] = aux["lb_loss"].mean()
      loss = loss + z_loss * metrics["z_loss"] + lb_loss * metrics["lb_loss"]
    return loss, metrics

  return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# The step.

def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, part: freeze.Partition, accum: int):
  """(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics); batch leading dim = accum."""

  def micro(trainable, frozen, mb):
    return loss_fn(freeze.join(trainable, frozen, part), mb)

  grad_fn = jax.value_and_grad(micro, has_aux=True)

  def step(trainable, opt_state, frozen, batch):
    if accum == 1:
      (loss, metrics), grads = grad_fn(trainable, frozen, jax.tree.map(lambda x: x[0], batch))
    else:
      def body(carry, mb):
        (loss, metrics), grads = grad_fn(trainable, frozen, mb)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None
      zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, trainable, frozen,
                                                         jax.tree.map(lambda x: x[0], batch)))
      (loss, metrics, grads), _ = jax.lax.scan(body, (zero[0][0], zero[0][1], zero[1]), batch)
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
      metrics = {k: (v if k == "tokens" else v / accum) for k, v in metrics.items()}
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return trainable, opt_state, metrics

  return step


# ----------------------------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class Result:
  params: dict
  steps: int
  tokens: float
  seconds: float
  history: list[dict]
  opt_state: Any = None  # the final optimiser state (over the trainable leaves only)


def to_micro(local: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
  """[B, ...] -> [accum, B/accum, ...] (the batch axis of each micro-batch stays axis 1)."""
  return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in local.items()}


class BatchSource(Protocol):
  """What a training step consumes. updates(step, current) returns the local batches of that step's optimiser
  updates ([B_local, ...] numpy dicts, one per update) and host stats for its metrics row; `current()` gives the
  parameters as they are now (RL samples its rollouts from them). data_iter: checkpointed with the state, or None."""
  data_iter: Any

  def updates(self, step: int, current: Callable[[], dict]) -> tuple[list[dict], dict]: ...


class IteratorSource:
  """One update per step from a batch iterator (the LM and SFT phases)."""

  def __init__(self, batches: Iterator[dict], data_iter=None):
    self.batches, self.data_iter = batches, data_iter

  def updates(self, step, current):
    return [next(self.batches)], {}


class Hook:
  """Called by train(): begin(start, steps) once; step(done) after every step; log(row) for each metrics row (host
  floats, at log points); end() once. A hook with `every` > 0 also gets evaluate(done, params) on those steps, and
  the dict it returns joins that step's row (periodic eval)."""
  every = 0

  def begin(self, start: int, steps: int) -> None: ...
  def step(self, done: int) -> None: ...
  def log(self, row: dict) -> None: ...
  def evaluate(self, done: int, params: dict) -> dict: return {}
  def flush(self) -> None: ...  # after each checkpoint: what is logged is on disk with it
  def end(self) -> None: ...
  def abort(self) -> None: ...  # the run stops with an exception: leave the terminal and the files tidy


def train(*, params: dict, cfg: ModelConfig, part: freeze.Partition, loss_fn: LossFn, batches, opt, steps: int,
          workdir: str, mesh, identity: dict, accum: int = 1, checkpoint_every: int = 100, log_every: int = 10,
          desc: str = "train", data_iter=None, updates_per_step: int = 1, hooks: Sequence[Hook] = (),
          divergence_factor: float = 10.0, checkpoint_fallback: bool = False) -> Result:
  """Trains `part`'s trainable leaves of `params` for `steps` steps; resumes from workdir/checkpoints if present.

  batches: a BatchSource, or an iterator of this process's share of each global batch ([B_local, ...] numpy dicts);
  data_iter (if it has get_state/set_state, e.g. a grain iterator) is checkpointed with the state so the data resumes
  exactly. updates_per_step: optimiser updates per step (RL: epochs x minibatches), for the schedule's length.
  checkpoint_fallback: a latest checkpoint that fails its checksums is moved aside and the previous one resumed
  (a stage config's `checkpoint_fallback`, the CLI's --checkpoint_fallback); else the run is refused.
  Built-in hooks: metrics.jsonl + TensorBoard (process 0) and a progress bar; `hooks` come after them.
  """
  workdir_lib.claim_checkpoints(workdir, identity, migrate=stage_configs.migrate_identity)
  source = batches if hasattr(batches, "updates") else IteratorSource(batches, data_iter)
  tx, sched = optim.adamw(opt, steps * updates_per_step)
  trainable, frozen, opt_state = init_state(params, cfg, part, tx, mesh)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), fallback=checkpoint_fallback)
  start = ckpt.latest_step() or 0
  history_path = os.path.join(workdir, "metrics.jsonl")
  if start:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            {"trainable": trainable, "opt_state": opt_state, "step": sharding.step_array(0, mesh)})
    state = ckpt.restore(start, abstract, source.data_iter)
    trainable, opt_state = state["trainable"], state["opt_state"]
  history = read_history(history_path, upto=start)

  # Pinning output shardings to the inputs' keeps step 2 from recompiling for a different layout.
  keep = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  step_fn = jax.jit(make_step(loss_fn, tx, part, accum), donate_argnums=(0, 1),
                    out_shardings=(keep(trainable), keep(opt_state), None))
  join_fn = jax.jit(functools.partial(freeze.join, part=part))
  current = lambda: join_fn(trainable, frozen)  # noqa: E731 (reads the loop's latest trainable)
  hooks = ([MetricsWriter(workdir, history_path, history)] if jax.process_index() == 0 else []) + \
      [Progress(desc)] + list(hooks)
  for h in hooks:
    h.begin(start, steps)
  tokens_seen = sum(h.get("tokens", 0.0) for h in history)
  t0, t_last = time.time(), time.time()
  prior_seconds = history[-1].get("elapsed", 0.0) if history else 0.0  # a resumed run adds up every process's time
  guard = guards.LossGuard(divergence_factor)  # 0: only non-finite numbers stop it (losses without a scale, RL)
  for row in history:
    guard.check(row, desc)
  pending: list[tuple[int, dict, dict]] = []
  preempt, stop, done = Preemption(), False, start
  try:
    for step in range(start, steps):
      local_batches, info = source.updates(step, current)
      outs = []
      for local in local_batches:
        batch = sharding.global_batch(to_micro(local, accum), mesh, batch_axis=1)
        trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch)
        outs.append(metrics)
      pending.append((step + 1, mean_metrics(outs), info))
      done = step + 1
      stop = preempt.reached(done)  # every host at the same step: the checkpoint below is collective
      evals = [h for h in hooks if h.every and done % h.every == 0]
      if done % log_every == 0 or done == steps or done % checkpoint_every == 0 or evals or stop:
        now = time.time()
        rows = []
        for s, m, stats in pending:  # one host sync per log interval, not per step
          row = {k: float(v) for k, v in m.items()}
          row.update(stats)
          row.update(step=s, lr=float(sched(s * updates_per_step - 1)))
          tokens_seen += row.get("tokens", 0.0)
          row.update(tokens_seen=tokens_seen, step_time=(now - t_last) / len(pending),
                     elapsed=prior_seconds + now - t0)
          rows.append(row)
        for h in evals:
          rows[-1].update(h.evaluate(done, current()))
        t_last, pending = now, []
        for row in rows:
          history.append(row)
          for h in hooks:
            h.log(row)
          guard.check(row, desc)  # before any save: a bad step never reaches a checkpoint
      for h in hooks:
        h.step(done)
      if done % checkpoint_every == 0 or done == steps or stop:
        ckpt.save(done, {"trainable": trainable, "opt_state": opt_state, "step": sharding.step_array(done, mesh)},
                  source.data_iter)
        for h in hooks:
          h.flush()
      if stop:
        break
    # One process also stops for a SIGTERM that came during the last step's save: its checkpoint is complete.
    if stop or (preempt.signalled and not preempt.multi):
      ckpt.close()
      raise Preempted(f"{desc}: stopped by SIGTERM after step {done} of {steps}, checkpoint saved in "
                      f"{ckpt.directory}; run the same command again to resume")
  except BaseException:  # a stopped run: the bar ends its line before the error is printed
    for h in hooks:
      h.abort()
    raise
  finally:
    preempt.close()
  ckpt.close()
  for h in hooks:
    h.end()
  final = freeze.join(trainable, frozen, part)
  return Result(params=final, steps=steps, tokens=tokens_seen, seconds=prior_seconds + time.time() - t0,
                history=history,
                opt_state=opt_state)


class Preemption:
  """SIGTERM as a request to stop at the next step boundary; `reached(step)` is asked once per step.

  One process: a Python handler notes the signal. Several processes: JAX's preemption service (started by
  jax.distributed.initialize) catches SIGTERM itself, on any host, and `reached_preemption_sync_point` turns True on
  every host at the same step; with the service disabled, the hosts all-gather their flags at every step instead.
  The previous SIGTERM handler is put back by close(): outside training SIGTERM ends the process as before.
  """

  def __init__(self):
    self.signalled = False
    self.multi = jax.process_count() > 1
    self.service = self.multi  # tried at the first step; a RuntimeError means it is disabled
    self.previous = None
    if not self.multi:
      self._install()

  def _install(self) -> None:
    if threading.current_thread() is threading.main_thread():  # Python handlers live in the main thread only
      previous = signal.signal(signal.SIGTERM, self._note)
      self.previous = signal.SIG_DFL if previous is None else previous  # None: not set from Python

  def _note(self, signum, frame) -> None:
    self.signalled = True

  def reached(self, step: int) -> bool:
    if not self.multi:
      return self.signalled
    from jax.experimental import multihost_utils
    if self.service:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # jax_enable_preemption_service=False
        self.service = False
        self._install()
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.signalled))))

  def close(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
      self.previous = None


def mean_metrics(outs: list[dict]) -> dict:
  """A step's metrics over its updates: the mean, but `tokens` summed; one update's are passed through as they are."""
  if len(outs) == 1:
    return outs[0]
  return {k: sum(o[k] for o in outs) / (1 if k == "tokens" else len(outs)) for k in outs[0]}


def init_state(params: dict, cfg: ModelConfig, part: freeze.Partition, tx: optax.GradientTransformation, mesh
               ) -> tuple[dict, dict, Any]:
  """(trainable, frozen, optimiser state) placed on the mesh by the logical-axis rules.

  Partially frozen leaves were sliced along the expert axis, so their shardings are re-derived from the slices.
  Trainable leaves are copied: the step donates them, and the caller's arrays must stay alive.
  """
  full = transformer.param_shardings(cfg, mesh, params)
  flat_shardings = pytree.flatten(full)
  trainable, frozen = freeze.split(jax.tree.map(jax.device_put, params, full), part)
  trainable = {k: jnp.copy(jax.device_put(v, sharding.slice_sharding(flat_shardings[k], v)))
               for k, v in trainable.items()}
  frozen = {k: jax.device_put(v, sharding.slice_sharding(flat_shardings[k], v)) for k, v in frozen.items()}
  opt_state = jax.jit(tx.init, out_shardings=sharding.opt_state_shardings(tx, trainable, mesh))(trainable)
  return trainable, frozen, opt_state


def read_history(path: str, upto: int) -> list[dict]:
  """metrics.jsonl rows of steps <= upto (rows written after the last checkpoint are dropped, then rewritten)."""
  if not os.path.exists(path) or not upto:
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        break  # a torn last line from a kill
      if row.get("step", 0) <= upto:
        rows.append(row)
  return rows


class MetricsWriter(Hook):
  """metrics.jsonl (rewritten on resume to the checkpointed prefix) + TensorBoard events."""

  def __init__(self, workdir: str, path: str, history: list[dict]):
    with open(path + ".tmp", "w") as f:
      for row in history:
        f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    self.f = open(path, "a")
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self.tb = None

  def log(self, row: dict) -> None:
    row = guards.json_safe(row)  # NaN -> null: every line stays valid JSON
    self.f.write(json.dumps(row) + "\n")
    self.f.flush()
    if self.tb:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, row["step"])

  def flush(self) -> None:
    self.f.flush()
    if self.tb:
      self.tb.flush()

  def end(self) -> None:
    self.f.close()
    if self.tb:
      self.tb.close()

  abort = end  # what was logged stays on disk


class Progress(Hook):
  """A tqdm bar on process 0 with the last logged loss."""

  def __init__(self, desc: str):
    self.desc, self.bar = desc, None

  def begin(self, start: int, steps: int) -> None:
    from tqdm import tqdm
    self.bar = tqdm(total=steps, initial=start, desc=self.desc, dynamic_ncols=True,
                    disable=jax.process_index() != 0, mininterval=2.0)

  def log(self, row: dict) -> None:
    if "loss" in row:
      self.bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)

  def step(self, done: int) -> None:
    self.bar.update(1)

  def end(self) -> None:
    self.bar.close()

  abort = end
