"""Training and decoding speed against limits measured in the same run (issue 2's benchmark, issue 9's benchmarks).

  python experiments/bench_train.py                                # CPU: all sections, ~15-30 min on 2 shared cores
  python experiments/bench_train.py --sections=peak,smollm2 --devices=8
  python experiments/bench_train.py --dtype=bfloat16 --attention=cudnn --sections=all   # the same script on a GPU

Sections (comma-separated, or "all"):
  fastpaths bf16 compute end to end through loop.train; remat policies; ragged_dot dropless; cuDNN attention.
  peak      fp32 (and --dtype) matmul FLOP/s on 1 device and summed over all devices, and memory bandwidth (a large
            array copy and sum). Every MFU below divides by the best matmul figure of this same run.
  smollm2   the SmolLM2-135M train step (random weights, the real shapes; AdamW over every leaf) at several batch x seq
            shapes, on 1 device and on a data-parallel mesh of all devices, full vs chunked LM-head loss.
  branch    dense vs 2-expert branch (midtrain partition: anchor frozen) train step at a ~1B shape (OLMo-1B-like),
            interleaved with a matmul: MFU per round against the matmul of that round.
  lora      the 2-expert branch step with a LoRA vs an ffn domain expert at SmolLM2's shape (--lora_stage).
  moe       an E=5 MoE train step at top_k 1, 2, E vs a dense model of equal active FLOPs (d_ff x k).
The compared steps of branch, lora and moe run interleaved (A B, B A, ... for --rounds rounds, after a warm-up step
each) and report the median ratio with its range: on a shared host the load drifts between separate measurements.
  decode    greedy decode tokens/s (KV cache, bar_jax.model.generate) against the memory-bandwidth bound
            B x bandwidth / (parameter bytes + KV-cache bytes read per step).

MFU = model FLOPs per token (matmuls + attention scores; forward 2N, backward 2N for activations and 2N for
trainable weights only) x tokens/s / peak. --devices simulates that many CPU devices (ignored off the CPU).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform

from experiments.host import host_line  # noqa: E402
import sys
import time


def _args():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sections", default="all")
  ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices (CPU only)")
  ap.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16 (params stay fp32)")
  ap.add_argument("--attention", default="xla", help="xla | cudnn")
  ap.add_argument("--remat", default="none", help="none | full | dots")
  ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
  ap.add_argument("--shapes", default="8x256,16x512,32x512", help="smollm2 global batch x seq shapes")
  ap.add_argument("--big_shape", default="8x256", help="batch x seq of the ~1B dense vs branch step (batch: a "
                  "multiple of the devices)")
  ap.add_argument("--big_layers", type=int, default=16, help="layers of the ~1B shape (fewer fit a small host's RAM)")
  ap.add_argument("--moe_shape", default="16x256", help="batch x seq of the MoE vs dense step")
  ap.add_argument("--moe_top_ks", default="1,2,E", help="top_k rows of the moe section (E: all experts)")
  ap.add_argument("--lora_shape", default="4x256", help="batch x seq of the SmolLM2 lora vs ffn branch step")
  ap.add_argument("--lora_layers", type=int, default=30, help="layers of the lora vs ffn branch (SmolLM2: 30)")
  ap.add_argument("--lora_stage", default="sft", help="partition of the lora vs ffn branch step (midtrain | sft)")
  ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the compared steps (branch, lora, moe)")
  ap.add_argument("--decode_batches", default="1,8")
  ap.add_argument("--decode_experts", default="1", help="decode rows for the dense model (1) and MoEs of E experts")
  ap.add_argument("--out", default="", help="markdown results file")
  return ap.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None and "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={ARGS.devices}"])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from configs.common import opt_defaults  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bar_jax import optim, pytree, sharding  # noqa: E402
from bar_jax.model import generate, transformer  # noqa: E402
from bar_jax.model.config import Compute, ModelConfig  # noqa: E402
from bar_jax.stages import loop  # noqa: E402
from bar_jax.transforms import freeze  # noqa: E402

SMOLLM2 = ModelConfig()  # the ModelConfig defaults are SmolLM2-135M's architecture
OLMO_1B = ModelConfig(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, head_dim=128,
                      d_ff=8192, tie_embeddings=True, rope_theta=10000.0)
LINES: list[str] = []


def say(line: str = "") -> None:
  print(line, flush=True)
  LINES.append(line)


def best_time(f, *args, repeats: int = 3) -> float:
  jax.block_until_ready(f(*args))  # compile + warm-up
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t)
  return best


# ----------------------------------------------------------------------------------------------------------------
# Limits of this machine.

def measure_peak(dtype: str) -> dict:
  n = 4096 if jax.default_backend() != "cpu" else 2048
  out = {}
  for dt in sorted({"float32", dtype}):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
    one = 2 * n ** 3 / best_time(jax.jit(lambda a: a @ a), a, repeats=5)
    mesh = sharding.make_mesh()
    nd = len(jax.devices())
    x = jax.device_put(jnp.tile(a, (nd, 1)), sharding.batch_sharding(mesh))
    b = jax.device_put(a, sharding.replicated(mesh))
    allv = 2 * nd * n ** 3 / best_time(jax.jit(lambda x, b: x @ b), x, b, repeats=5)
    out[dt] = {"one": one, "all": allv, "best": max(one, allv)}
  big = jnp.ones((64 << 20,), jnp.float32)  # 256 MiB
  copy = 2 * big.nbytes / best_time(jax.jit(lambda x: x * 2.0), big)
  red = big.nbytes / best_time(jax.jit(jnp.sum), big)
  out["bandwidth"] = max(copy, red)
  out["bandwidth_copy"], out["bandwidth_sum"] = copy, red
  return out


# ----------------------------------------------------------------------------------------------------------------
# Train steps.

def chunked_lm_loss(cfg: ModelConfig, mesh, chunk: int, compute: Compute = Compute()):
  """lm_loss with the LM head + cross-entropy run over `chunk`-token slices of the sequence (bar_jax/model/loss.py):
  the [B, T, V] logits never exist at once (the backward recomputes one slice at a time)."""
  return loop.lm_loss(cfg, mesh, compute=compute, ce_chunk=chunk)


def train_flops_per_token(cfg: ModelConfig, seq: int, trainable_active: int | None = None) -> float:
  """Forward 2A + S, backward 2A + 2S for activations, + 2 A_t for the trainable weights (A_t = A when all train)."""
  a = transformer.active_matmul_params(cfg)
  s = 2 * 2 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim / 2
  at = a if trainable_active is None else trainable_active
  return 2 * a + s + 2 * a + 2 * s + 2 * at


def matmul_now(mesh) -> float:
  """fp32/--dtype matmul FLOP/s over the mesh's devices right now (the CPU here is shared: the peak drifts)."""
  n = 2048 if jax.default_backend() == "cpu" else 8192
  nd = mesh.size
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(ARGS.dtype if ARGS else jnp.float32)
  x = jax.device_put(jnp.tile(a, (nd, 1)), sharding.batch_sharding(mesh))
  b = jax.device_put(a, sharding.replicated(mesh))
  return 2 * nd * n ** 3 / best_time(jax.jit(lambda x, b: x @ b), x, b, repeats=3)


class StepRunner:
  """One model's jitted train step with its state; `run()` times one step (the state carries on)."""

  def __init__(self, cfg: ModelConfig, batch: int, seq: int, *, mesh, stage: str = "dense", loss: str = "full",
               compute: Compute = Compute()):
    params = transformer.init_params(cfg, jax.random.key(0))
    part = freeze.make_partition(params, cfg, freeze.SCHEDULE[stage])
    pshard = transformer.param_shardings(cfg, mesh, params)
    params = jax.device_put(params, pshard)
    flat = pytree.flatten(pshard)
    trainable, frozen = freeze.split(params, part)
    del params
    self.trainable = {k: jax.device_put(v, sharding.slice_sharding(flat[k], v)) for k, v in trainable.items()}
    self.frozen = {k: jax.device_put(v, sharding.slice_sharding(flat[k], v)) for k, v in frozen.items()}
    tx, _ = optim.adamw(opt_defaults(warmup_steps=0, weight_decay=0.01), 1000)
    self.opt_state = jax.jit(tx.init, out_shardings=sharding.opt_state_shardings(tx, self.trainable, mesh))(
        self.trainable)
    loss_fn = loop.lm_loss(cfg, mesh, compute=compute) if loss == "full" else \
        chunked_lm_loss(cfg, mesh, int(loss.split("=")[1]), compute)
    keep = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    self.step = jax.jit(loop.make_step(loss_fn, tx, part, 1), donate_argnums=(0, 1),
                        out_shardings=(keep(self.trainable), keep(self.opt_state), None))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (1, batch, seq + 1), dtype=np.int32)
    host = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "mask": np.ones((1, batch, seq), np.float32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)).copy(),
            "segment_ids": np.ones((1, batch, seq), np.int32)}
    self.data = sharding.global_batch(host, mesh, batch_axis=1)
    self.tokens = batch * seq
    self.first_s = self.run()  # compile + the first step

  def run(self) -> float:
    t = time.perf_counter()
    self.trainable, self.opt_state, self.metrics = self.step(self.trainable, self.opt_state, self.frozen, self.data)
    jax.block_until_ready(self.metrics)
    return time.perf_counter() - t

  def close(self):
    del self.trainable, self.opt_state, self.frozen, self.data
    gc.collect()


def interleaved(runs: dict, rounds: int) -> dict[str, list[float]]:
  """Times each callable once per round, in alternating order (A B, B A, ...): load on a shared host drifts, and a
  ratio of neighbouring runs is far steadier than a ratio of two separate best-ofs."""
  names = list(runs)
  times = {n: [] for n in names}
  for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
      times[n].append(runs[n]())
  return times


def ratio_stats(num: list[float], den: list[float]) -> dict:
  """Median and range of the per-round ratios num/den, and each side's median seconds."""
  r = sorted(a / b for a, b in zip(num, den))
  return {"ratio": float(np.median(r)), "lo": r[0], "hi": r[-1], "num_s": float(np.median(num)),
          "den_s": float(np.median(den)), "rounds": len(r)}


def fmt_ratio(st: dict) -> str:
  return f"{st['ratio']:.3f} ({st['lo']:.3f}-{st['hi']:.3f}, {st['rounds']} rounds)"


def bench_step(cfg: ModelConfig, batch: int, seq: int, *, mesh, stage: str = "dense", loss: str = "full",
               steps: int = 3, peak: float = 1.0, trainable_active: int | None = None,
               compute: Compute = Compute()) -> dict:
  gc.collect()
  peak_before = matmul_now(mesh)
  runner = StepRunner(cfg, batch, seq, mesh=mesh, stage=stage, loss=loss, compute=compute)
  dt = min(runner.run() for _ in range(steps))
  tps = batch * seq / dt
  flops = train_flops_per_token(cfg, seq, trainable_active) * tps
  loss_value = float(runner.metrics["loss"])
  first = runner.first_s
  runner.close()
  local_peak = max(peak_before, matmul_now(mesh))
  return {"step_s": dt, "first_s": first, "tokens_s": tps, "flops": flops, "mfu": flops / peak,
          "local_peak": local_peak, "mfu_local": flops / local_peak, "loss": loss_value}


def trainable_active_params(cfg: ModelConfig, stage: str) -> int:
  """Matmul parameters per token whose weight gradient the stage computes (branch: the non-anchor experts + router,
  plus the LM head when embeddings train)."""
  if stage == "dense":
    return transformer.active_matmul_params(cfg)
  D, F, L = cfg.d_model, cfg.d_ff, cfg.n_layers
  n = L * (3 * D * F * (cfg.k - 1) + D * cfg.n_experts)
  if stage == "sft":
    n += D * cfg.vocab_size
  return n


def _mesh_for(n_devices: int):
  """FSDP over all devices (batch split the same way): simulated CPU devices share the host's RAM, so replicating
  135M params + AdamW 8 times over (plain data parallel) would need 8x the memory."""
  return sharding.make_mesh({"fsdp": -1}, devices=jax.devices()[:n_devices])


def _shape(s: str) -> tuple[int, int]:
  b, t = s.split("x")
  return int(b), int(t)


# ----------------------------------------------------------------------------------------------------------------
# Sections.

def compute_from(args, **kw) -> Compute:
  return Compute(dtype=args.dtype, attention=args.attention, remat=args.remat).replace(**kw).validate()


def section_smollm2(args, peak):
  cfg, compute = SMOLLM2, compute_from(args)
  say("## SmolLM2-135M train step (random weights, real shapes; AdamW on all 135M parameters)\n")
  say("| devices | batch x seq | LM-head loss | step s | first step s (compile) | tokens/s | model GFLOP/s | MFU | "
      "matmul GFLOP/s at the time | MFU vs that |")
  say("|---|---|---|---|---|---|---|---|---|---|")
  nd = len(jax.devices())
  runs = []
  for s in args.shapes.split(","):
    b, t = _shape(s)
    runs.append((nd, b, t, "full"))
  b, t = _shape(args.shapes.split(",")[0])
  runs += [(1, b, t, "full"), (nd, b, t, "chunked=128")]
  best = None
  for n, b, t, loss in runs:
    if b % n:
      continue
    r = bench_step(cfg, b, t, mesh=_mesh_for(n), loss=loss, steps=args.steps, peak=peak, compute=compute)
    say(f"| {n} | {b} x {t} | {loss} | {r['step_s']:.3f} | {r['first_s']:.1f} | {r['tokens_s']:.0f} | "
        f"{r['flops'] / 1e9:.1f} | {100 * r['mfu']:.1f}% | {r['local_peak'] / 1e9:.1f} | {100 * r['mfu_local']:.1f}% |")
    if best is None or r["mfu"] > best[1]["mfu"]:
      best = ((n, b, t, loss), r)
  say(f"\nBest: {best[0]} at {100 * best[1]['mfu']:.1f}% MFU ({best[1]['tokens_s']:.0f} tokens/s).\n")


def matmul_runner(mesh):
  """(run() -> seconds, FLOPs per run): a 2048^3 fp32/--dtype matmul per device of the mesh, timed between the steps
  it is compared with, so an MFU is a ratio of neighbouring measurements (the shared CPU's speed drifts)."""
  n = 2048 if jax.default_backend() == "cpu" else 8192
  nd = mesh.size
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(ARGS.dtype if ARGS else jnp.float32)
  x = jax.device_put(jnp.tile(a, (nd, 1)), sharding.batch_sharding(mesh))
  b = jax.device_put(a, sharding.replicated(mesh))
  f = jax.jit(lambda x, b: x @ b)
  jax.block_until_ready(f(x, b))

  def run():  # the best of 3: one call right after a long step ran at about half the peak (caches, clocks)
    best = float("inf")
    for _ in range(3):
      t = time.perf_counter()
      jax.block_until_ready(f(x, b))
      best = min(best, time.perf_counter() - t)
    return best
  return run, 2 * nd * n ** 3


def section_branch(args, peak):
  cfg, compute = OLMO_1B.replace(n_layers=args.big_layers), compute_from(args)
  b, t = _shape(args.big_shape)
  mesh = _mesh_for(len(jax.devices()))
  if b % len(jax.devices()):  # the batch is split over every device (fsdp); say so instead of an IndivisibleError
    raise SystemExit(f"--big_shape={args.big_shape}: the batch {b} must be a multiple of the {len(jax.devices())} "
                     f"devices; pass e.g. --big_shape={len(jax.devices())}x{t} or --devices=1")
  say(f"## Dense vs branch train step at a ~1B shape (d={cfg.d_model}, L={cfg.n_layers}, F={cfg.d_ff}, "
      f"V={cfg.vocab_size}), batch {b} x {t}\n")
  models = {"dense": (cfg, "dense"), "branch E=2": (cfg.replace(ffn="moe", n_experts=2), "midtrain")}
  runners, flops = {}, {}
  for name, (c, stage) in models.items():
    runners[name] = StepRunner(c, b, t, mesh=mesh, stage=stage, compute=compute)
    flops[name] = train_flops_per_token(c, t, trainable_active_params(c, stage)) * b * t
  mm, mm_flops = matmul_runner(mesh)
  times = interleaved({"matmul": mm, **{n: r.run for n, r in runners.items()}}, args.rounds)
  say("Each round times a 2048^3 matmul per device and one step of each model, in alternating order; MFU = the "
      "step's model FLOP/s over that round's matmul FLOP/s (median and range over the rounds).\n")
  say("| model | stage | params (B) | step s (median) | tokens/s | model GFLOP/s | MFU vs matmul of the round "
      "| MFU vs the run's peak |")
  say("|---|---|---|---|---|---|---|---|")
  for name, (c, stage) in models.items():
    n_params = sum(math.prod(s) for s in jax.tree.leaves(transformer.param_shapes(c),
                                                        is_leaf=lambda x: isinstance(x, tuple)))
    mfu = sorted(flops[name] / ts / (mm_flops / tm) for ts, tm in zip(times[name], times["matmul"]))
    step_s = float(np.median(times[name]))
    say(f"| {name} | {stage} | {n_params / 1e9:.2f} | {step_s:.2f} | {b * t / step_s:.0f} | "
        f"{flops[name] / step_s / 1e9:.1f} | {100 * np.median(mfu):.1f}% ({100 * mfu[0]:.1f}-{100 * mfu[-1]:.1f}%) | "
        f"{100 * flops[name] / step_s / peak:.1f}% |")
    runners[name].close()
  st = ratio_stats(times["branch E=2"], times["dense"])
  say(f"\nbranch / dense step time: {fmt_ratio(st)}; matmul of the rounds "
      f"{mm_flops / np.median(times['matmul']) / 1e9:.1f} GFLOP/s (median).\n")


def section_lora(args, peak):
  """LoRA vs ffn experts in the 2-expert branch at SmolLM2's shape, same stage, interleaved."""
  cfg, compute = SMOLLM2.replace(ffn="moe", n_experts=2, n_layers=args.lora_layers), compute_from(args)
  b, t = _shape(args.lora_shape)
  mesh = _mesh_for(len(jax.devices()))
  stage = args.lora_stage
  say(f"## Branch step: LoRA (rank {cfg.lora_rank}) vs ffn domain expert, SmolLM2-135M shape ({cfg.n_layers} "
      f"layers), stage {stage}, batch {b} x {t}\n")
  runners = {"ffn": StepRunner(cfg, b, t, mesh=mesh, stage=stage, compute=compute),
             "lora": StepRunner(cfg.replace(expert_kind="lora"), b, t, mesh=mesh, stage=stage, compute=compute)}
  times = interleaved({n: r.run for n, r in runners.items()}, args.rounds)
  st = ratio_stats(times["lora"], times["ffn"])
  say("| ffn branch step s | lora branch step s | lora / ffn (median, range) | goal |")
  say("|---|---|---|---|")
  say(f"| {st['den_s']:.3f} | {st['num_s']:.3f} | {fmt_ratio(st)} | <= 0.75 |")
  say("")
  for r in runners.values():
    r.close()


def section_moe(args, peak):
  E = 5
  base = SMOLLM2.replace(n_layers=8)
  b, t = _shape(args.moe_shape)
  mesh = _mesh_for(len(jax.devices()))
  say(f"## MoE (E={E}) vs dense with equal active FLOPs, SmolLM2 widths, {base.n_layers} layers, batch {b} x {t}, "
      f"all parameters trained, {len(jax.devices())} device(s)\n")
  say("| top_k | MoE dispatch | MoE step s | dense (d_ff x k) step s | MoE / dense (median, range) | goal |")
  say("|---|---|---|---|---|---|")
  for k in [E if k == "E" else int(k) for k in args.moe_top_ks.split(",")]:
    moe_cfg = base.replace(ffn="moe", n_experts=E, top_k=k)
    moe_compute = compute_from(args, dispatch="dense" if k == E else "dropless")
    runners = {"moe": StepRunner(moe_cfg, b, t, mesh=mesh, stage="rl", compute=moe_compute),
               "dense": StepRunner(base.replace(d_ff=base.d_ff * k), b, t, mesh=mesh, compute=compute_from(args))}
    times = interleaved({n: r.run for n, r in runners.items()}, args.rounds)
    st = ratio_stats(times["moe"], times["dense"])
    goal = "<= 1.05" if k == E else "<= 1.25 (1 device)"
    say(f"| {k} | {moe_compute.dispatch} | {st['num_s']:.3f} | {st['den_s']:.3f} | {fmt_ratio(st)} | {goal} |")
    for r in runners.values():
      r.close()
  say("\n(\"rl\" is the partition that trains every leaf, experts included; the anchor is not frozen here.)\n")


def section_decode(args, bandwidth):
  for E in (int(x) for x in args.decode_experts.split(",")):
    _decode_rows(args, bandwidth, SMOLLM2 if E == 1 else SMOLLM2.replace(ffn="moe", n_experts=E))


def _decode_rows(args, bandwidth, cfg):
  compute = Compute(dtype=args.dtype, attention=args.attention)
  params = transformer.init_params(cfg, jax.random.key(0))
  if args.dtype != "float32":  # serve compute-dtype weights: half the bytes per step
    params = jax.tree.map(lambda w: w.astype(args.dtype), params)
  dev = jax.devices()[0]
  params = jax.device_put(params, dev)
  prompt, new = 64, 128
  n_params = transformer.count_params(params)
  itemsize = jnp.dtype(args.dtype).itemsize
  what = "dense" if cfg.ffn == "dense" else f"MoE of {cfg.n_experts} experts, all active (top_k = E)"
  say(f"## Decode (SmolLM2-135M shapes, {what}, greedy, one device, prompt {prompt} + {new} new tokens, "
      f"{args.dtype} weights and KV cache)\n")
  say("The matmul rate is one [batch, d_model] x [d_model, n_layers * d_ff] product timed here: what a step's "
      "matmuls could reach at this batch with these kernels.\n")
  say("| batch | decode ms/step | tokens/s | model GFLOP/s | matmul GFLOP/s at this batch | of matmul | "
      "bytes/step (MB) | bandwidth bound tokens/s | of bound |")
  say("|---|---|---|---|---|---|---|---|---|")
  flops_per_token = 2 * transformer.active_matmul_params(cfg)
  for B in (int(x) for x in args.decode_batches.split(",")):
    tokens = jax.device_put(jnp.ones((B, prompt), jnp.int32), dev)
    lens = jnp.full((B,), prompt, jnp.int32)
    stop = (jnp.asarray([-1], jnp.int32), jnp.int32(0), jnp.float32(0), jnp.float32(1))  # no eos, greedy

    def run(n):  # every row prefilled at once, then n - 1 decode steps (the engine of model/generate.py)
      state = generate._empty_state(cfg, B, prompt + new, new, args.dtype, 0, jax.random.key(0))
      state = generate._prefill(params, state, tokens, lens, jnp.arange(B, dtype=jnp.int32),
                                jnp.full((B,), n, jnp.int32), *stop, cfg=cfg, compute=compute, greedy=True)
      return generate._decode(params, state, jnp.int32(B), *stop, cfg=cfg, compute=compute, greedy=True)["out"]
    short, full = best_time(run, 8), best_time(run, new)
    per_step = (full - short) / (new - 8)
    cache_len = prompt + new
    kv = 2 * cfg.n_layers * B * cache_len * cfg.n_kv_heads * cfg.head_dim * itemsize
    step_bytes = n_params * itemsize + kv  # tied embedding: the LM head reads the whole table each step
    bound = B * bandwidth / step_bytes
    x, w = jnp.ones((B, cfg.d_model), args.dtype), jnp.ones((cfg.d_model, cfg.n_layers * cfg.d_ff), args.dtype)
    matmul = 2 * B * cfg.d_model * cfg.n_layers * cfg.d_ff / best_time(jax.jit(jnp.matmul), x, w, repeats=5)
    model_rate = B / per_step * flops_per_token
    say(f"| {B} | {1e3 * per_step:.2f} | {B / per_step:.0f} | {model_rate / 1e9:.1f} | {matmul / 1e9:.1f} | "
        f"{model_rate / matmul:.2f} | {step_bytes / 1e6:.0f} | {bound:.0f} | {100 * B / per_step / bound:.0f}% |")
  say("")


def section_fastpaths(args):
  """bf16 compute end to end through loop.train, remat policies, ragged_dot dropless, cuDNN attention: each compiles
  and agrees with the reference where this backend can run it."""
  import tempfile
  from bar_jax.model import dispatch
  from bar_jax.model.config import tiny
  say("## Fast paths on this backend\n")
  say("| path | result |")
  say("|---|---|")
  mesh = _mesh_for(len(jax.devices()))
  opt = opt_defaults(lr=3e-3, warmup_steps=0)
  rng = np.random.default_rng(0)
  fixed = rng.integers(0, 256, (16, 33), dtype=np.int32)  # one batch repeated: the loss must fall

  def batches():
    while True:
      yield {"inputs": fixed[:, :-1], "targets": fixed[:, 1:], "mask": np.ones((16, 32), np.float32),
             "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (16, 32)).copy(),
             "segment_ids": np.ones((16, 32), np.int32)}

  finals = {}
  for dt in ("float32", "bfloat16"):
    cfg, compute = tiny(), Compute(dtype=dt, remat="dots")
    params = transformer.init_params(cfg, jax.random.key(0))
    with tempfile.TemporaryDirectory() as wd:
      r = loop.train(params=params, cfg=cfg, part=freeze.make_partition(params, cfg, freeze.SCHEDULE["dense"]),
                     loss_fn=loop.lm_loss(cfg, mesh, compute=compute), batches=batches(), opt=opt, steps=8,
                     workdir=wd, mesh=mesh, identity={"bench": dt}, checkpoint_every=8, log_every=8)
    losses = [h["loss"] for h in r.history]
    dtypes = {str(x.dtype) for x in jax.tree.leaves(r.params)}
    finals[dt] = r.history[-1]["loss"]
    say(f"| loop.train, compute {dt}, remat dots, fsdp mesh | loss {r.history[0]['loss']:.3f} after step 1 -> "
        f"{losses[-1]:.3f} after 8; parameter dtypes {sorted(dtypes)} |")
  say(f"| bf16 vs fp32 final loss | {finals['bfloat16']:.4f} vs {finals['float32']:.4f} "
      f"({100 * abs(finals['bfloat16'] / finals['float32'] - 1):.2f}% apart) |")

  cfg = tiny()
  params = transformer.init_params(cfg, jax.random.key(0))
  tok = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  grads = {}
  for remat in ("none", "full", "dots"):
    c = Compute(remat=remat)
    grads[remat] = jax.jit(jax.grad(lambda p: transformer.forward(p, tok, cfg, compute=c)[0].mean()))(params)
  diff = max(float(jnp.abs(a - b).max()) for r in ("full", "dots")
             for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[r])))
  say(f"| remat none / full / dots | all compile; max gradient difference vs none {diff:.1e} |")

  k = jax.random.split(jax.random.key(2), 5)
  E, D, F, N = 4, 32, 64, 256
  x = jax.random.normal(k[0], (N, D))
  w = [jax.random.normal(k[i], (E, D, F) if i < 3 else (E, F, D)) / 8 for i in (1, 2, 3)]
  logits = jax.random.normal(k[4], (N, E))
  top, idx = jax.lax.top_k(jax.nn.softmax(logits), 2)
  weights = jnp.sum(jax.nn.one_hot(idx, E) * top[..., None], axis=-2)
  ys = {impl: jax.jit(lambda x: dispatch.dropless(x, weights, idx, *w, impl=impl))(x) for impl in ("blocked", "ragged")}
  say(f"| dropless with jax.lax.ragged_dot (the GPU/TPU path) | compiles on {jax.default_backend()}; max difference "
      f"vs the blocked CPU path {float(jnp.abs(ys['ragged'] - ys['blocked']).max()):.1e} |")

  try:
    c = Compute(attention="cudnn", dtype="bfloat16")
    out = jax.jit(lambda p: transformer.forward(p, tok, cfg, compute=c)[0])(params)
    ref = jax.jit(lambda p: transformer.forward(p, tok, cfg, compute=c.replace(attention="xla"))[0])(params)
    say(f"| attention implementation=cudnn | runs; max difference vs xla {float(jnp.abs(out - ref).max()):.1e} |")
  except Exception as e:  # expected off NVIDIA GPUs
    say(f"| attention implementation=cudnn | not available on {jax.default_backend()}: {type(e).__name__}: "
        f"{str(e).splitlines()[0][:160]} |")
  say("")


def main(args):
  import flax
  sections = set(args.sections.split(",")) if args.sections != "all" else {"peak", "fastpaths", "smollm2",
                                                                            "branch", "lora", "moe", "decode"}
  dev = jax.devices()[0]
  say("# bar_jax benchmarks\n")
  say(f"Command: `python experiments/bench_train.py {' '.join(sys.argv[1:])}`  ")
  say(f"Device: {len(jax.devices())} x {dev.platform.upper()} ({getattr(dev, 'device_kind', '')}), "
      f"host {platform.processor() or platform.machine()} with {os.cpu_count()} cores; "
      f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, Python {platform.python_version()}; "
      f"compute dtype {args.dtype}, attention {args.attention}, remat {args.remat}.  ")
  say(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {host_line()}\n")
  p = measure_peak(args.dtype)
  peak = p[args.dtype]["best"]
  say("## Limits measured in this run\n")
  for dt in sorted(k for k in p if k.startswith(("float", "bfloat"))):
    say(f"- {dt} matmul: {p[dt]['one'] / 1e9:.1f} GFLOP/s on one device, {p[dt]['all'] / 1e9:.1f} GFLOP/s over "
        f"{len(jax.devices())} devices")
  say(f"- memory bandwidth: {p['bandwidth'] / 1e9:.1f} GB/s (copy {p['bandwidth_copy'] / 1e9:.1f}, "
      f"sum {p['bandwidth_sum'] / 1e9:.1f})")
  say(f"- MFU below is against {peak / 1e9:.1f} GFLOP/s ({args.dtype}, the better of the two).\n")
  if "fastpaths" in sections:
    section_fastpaths(args)
  if "smollm2" in sections:
    section_smollm2(args, peak)
  if "branch" in sections:
    section_branch(args, peak)
  if "lora" in sections:
    section_lora(args, peak)
  if "moe" in sections:
    section_moe(args, peak)
  if "decode" in sections:
    section_decode(args, p["bandwidth"])
  say(f"End: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {host_line()}")
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
  main(ARGS)
