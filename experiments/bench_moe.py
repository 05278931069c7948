"""MoE dispatch and merge benchmark at SmolLM2 shapes (D=576, F=1536), E=5 experts, ~4096 tokens.

  python experiments/bench_moe.py            # ~5 min on 2 idle CPU cores; writes experiments/results/bench_moe.md
  BENCH_MOE_TOKENS=400 python experiments/bench_moe.py --no_merge --out=experiments/results/bench_moe_small.md

Dispatch: step time (forward + backward w.r.t. tokens, router and experts) of one MoE layer per dispatch path at
top_k = 1, 2, 5, against a dense SwiGLU FFN of width k*F (the same active FLOPs), on 1 and on 8 simulated CPU
devices (two subprocesses with different XLA_FLAGS). On 8 devices the tokens are split over a data axis of 8;
expert_parallel needs an expert axis dividing E=5, so it runs on 5 of the 8 devices (expert=5). On 1 device
expert_parallel falls back to dropless (no expert axis). At top_k = E the wide FFN also runs on the experts given as
E separate arrays (as the model's layer scan hands them to it), which leaves out the copy of the stacked [E, D, F]
leaves into per-expert arrays. Each process also measures its fp32 matmul peak.

Merge: the merge transform on 4 branches with SmolLM2's shapes and random weights, served by a lazy mapping that
makes each leaf when it is read (as artifact.open_params reads it from disk): run time, peak memory (tracemalloc,
which sees numpy's buffers) against the bytes read and written. Goals: dispatch overhead <= 20% over the dense cost
of the active FLOPs; merge peak memory <= 1.5x the output size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from experiments.host import host_line

D, F, E, TOP_KS, RANK = 576, 1536, 5, (1, 2, 5), 16
N_TOKENS = int(os.environ.get("BENCH_MOE_TOKENS", 4080))  # 4080 ~ 4096, divisible by 8 and by 5 batch shards
ROUNDS = int(os.environ.get("BENCH_MOE_ROUNDS", 3))


def _runner(f, *args):
  """run() -> seconds of one call of the jitted f (compiled and warmed up here)."""
  import jax
  jax.block_until_ready(f(*args))

  def run():
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t
  return run


def _interleaved(runs: dict, rounds: int) -> dict:
  """Each variant once per round, alternating the order; per-round ratios to `base` (load drifts between rounds)."""
  names = list(runs)
  times = {n: [] for n in names}
  for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
      times[n].append(runs[n]())
  return times


def _stats(times: dict, base: str) -> dict:
  import numpy as np
  out = {}
  for n, ts in times.items():
    r = sorted(t / b for t, b in zip(ts, times[base]))
    out[n] = {"s": float(np.median(ts)), "ratio": float(np.median(r)), "lo": r[0], "hi": r[-1]}
  return out


def matmul_peak() -> float:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
  run = _runner(jax.jit(lambda a: a @ a), a)
  return 2 * 2048 ** 3 / min(run() for _ in range(3)) / 1e9


def dispatch_worker(n_devices: int) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from bar_jax.model import dispatch, moe
  from bar_jax.model.config import Compute, ModelConfig
  from bar_jax.sharding import make_mesh, BATCH_AXES

  assert jax.device_count() == n_devices
  ks = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(ks[0], (N_TOKENS, D), jnp.float32)
  p = {"router": {"kernel": jax.random.normal(ks[1], (D, E)) * 0.05},
       "experts": {"gate": jax.random.normal(ks[2], (E, D, F)) / D ** .5,
                   "up": jax.random.normal(ks[3], (E, D, F)) / D ** .5,
                   "down": jax.random.normal(ks[4], (E, F, D)) / F ** .5}}
  lora_p = {"router": p["router"], "experts": {w: v[:1] for w, v in p["experts"].items()},
            "lora": {w: {"a": jax.random.normal(ks[6], (E - 1, i, RANK)) / i ** .5,
                         "b": jax.random.normal(ks[7], (E - 1, RANK, o)) * 0.01}
                     for w, (i, o) in {"gate": (D, F), "up": (D, F), "down": (F, D)}.items()}}
  split_params = {"router": p["router"], "experts": {w: list(v) for w, v in p["experts"].items()}}
  probe = jax.random.normal(ks[5], (N_TOKENS, D))
  data_mesh = make_mesh({"data": n_devices}) if n_devices > 1 else None
  ep_mesh = make_mesh({"expert": E}, devices=jax.devices()[:E]) if n_devices >= E else None

  def place(tree, mesh, batch):
    if mesh is None:
      return tree
    return jax.device_put(tree, NamedSharding(mesh, P(BATCH_AXES) if batch else P()))

  def moe_step(cfg, compute, mesh, params=p, ffn=moe.moe_ffn, cpu_impl=dispatch.CPU_IMPL):
    def loss(p, x):
      y, aux = ffn(p, x[None], cfg, mesh=mesh, compute=compute)
      return jnp.sum(y[0] * probe_s) + 1e-3 * aux["z_loss"]
    probe_s = place(probe, mesh, True)
    default, dispatch.CPU_IMPL = dispatch.CPU_IMPL, cpu_impl  # read when the step is traced, in _runner
    try:
      return _runner(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), place(params, mesh, False),
                     place(x, mesh, True))
    finally:
      dispatch.CPU_IMPL = default

  def materialised_lora(p, x, cfg, mesh=None, compute=None):
    """The previous LoRA layer: experts materialised (anchor + a b) and run one by one on every token."""
    xt = x.reshape(-1, D)
    weights, idx, logits = moe.route(p["router"]["kernel"], xt, cfg)
    g, u, d = moe.expert_weights(p, cfg)
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", xt, g)) * jnp.einsum("nd,edf->enf", xt, u)
    y = jnp.einsum("end,ne->nd", jnp.einsum("enf,efd->end", h, d), weights)
    return y.reshape(x.shape), moe.router_losses(logits, weights, idx, E)

  def dense_ffn_step(k, mesh):
    w = {"gate": jnp.concatenate([p["experts"]["gate"][i % E] for i in range(k)], 1),
         "up": jnp.concatenate([p["experts"]["up"][i % E] for i in range(k)], 1),
         "down": jnp.concatenate([p["experts"]["down"][i % E] for i in range(k)], 0)}

    def loss(w, x):
      y = (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
      return jnp.sum(y * probe_s)
    probe_s = place(probe, mesh, True)
    return _runner(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), place(w, mesh, False), place(x, mesh, True))

  out = {"devices": n_devices, "peak_gflops": matmul_peak(), "rows": []}
  for k in TOP_KS:
    cfg = ModelConfig(d_model=D, d_ff=F, n_layers=1, ffn="moe", n_experts=E, top_k=k)
    runs = {"dense_ffn": dense_ffn_step(k, data_mesh)}
    for kind in ("dense", "dropless", "expert_parallel"):
      mesh = ep_mesh if kind == "expert_parallel" else data_mesh
      if kind == "expert_parallel" and mesh is None:
        continue  # no expert axis on one device: it is the dropless path
      runs[kind] = moe_step(cfg, Compute(dispatch=kind), mesh)
    if k < E:  # the CPU's other grouped matmul (batched blocks over gathered weights), for comparison
      runs["dropless_blocked"] = moe_step(cfg, Compute(dispatch="dropless"), data_mesh, cpu_impl="blocked")
    else:  # the wide FFN on E separate expert arrays, as the model's layer scan hands them over (unstack_experts)
      runs["dense_split"] = moe_step(cfg, Compute(dispatch="dense"), data_mesh, split_params)
    row = {"k": k, "flops": 3 * 2 * N_TOKENS * 3 * D * F * k, **_stats(_interleaved(runs, ROUNDS), "dense_ffn")}
    out["rows"].append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  # LoRA experts (E-1 adapters of rank RANK over one anchor), all active: the side path against the materialised
  # layout it replaces and against one dense FFN of width F (the anchor's FLOPs; the adapters add ~3% at rank 16).
  cfg = ModelConfig(d_model=D, d_ff=F, n_layers=1, ffn="moe", n_experts=E, expert_kind="lora", lora_rank=RANK)
  runs = {"dense_ffn": dense_ffn_step(1, data_mesh), "lora": moe_step(cfg, Compute(), data_mesh, lora_p),
          "lora_materialised": moe_step(cfg, Compute(), data_mesh, lora_p, materialised_lora)}
  out["lora"] = _stats(_interleaved(runs, ROUNDS), "dense_ffn")
  print(json.dumps(out["lora"]), file=sys.stderr, flush=True)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Merge.

class RandomBranch(dict):
  """{path: array} of a SmolLM2-shaped 2-expert branch whose leaves are made when read (like a lazy reader)."""

  def __init__(self, shapes: dict, seed: int):
    super().__init__(shapes)
    self.seed = seed
    self.bytes_read = 0

  def __getitem__(self, path):
    import numpy as np
    shape = super().__getitem__(path)
    rng = np.random.default_rng([self.seed, abs(hash(path)) % 2 ** 31])
    x = rng.random(shape, dtype=np.float32)
    self.bytes_read += x.nbytes
    return x


def merge_worker(n_branches: int = 4) -> dict:
  import tracemalloc


  from bar_jax import pytree
  from bar_jax.model import transformer
  from bar_jax.model.config import ModelConfig
  from bar_jax.transforms import merge as merge_lib

  cfg = ModelConfig(ffn="moe", n_experts=2)  # SmolLM2-135M shapes, 2-expert ffn branch
  shapes = {k: v for k, v in pytree.as_flat(transformer.param_shapes(cfg)).items()}
  branches = [RandomBranch(shapes, seed) for seed in range(n_branches)]
  t = time.perf_counter()
  for path in shapes:  # the cost of producing ("reading") every leaf once, without merging
    branches[0][path]
  read_one = time.perf_counter() - t
  branches[0].bytes_read = 0
  tracemalloc.start()
  base_mem = tracemalloc.get_traced_memory()[0]
  t = time.perf_counter()
  merged, mcfg = merge_lib.merge(None, branches, [cfg] * n_branches, rule="average_branches")
  seconds = time.perf_counter() - t
  peak = tracemalloc.get_traced_memory()[1] - base_mem
  tracemalloc.stop()
  out_bytes = sum(x.nbytes for x in pytree.as_flat(merged).values())
  del merged
  return {"branches": n_branches, "seconds": seconds, "read_seconds_est": read_one * n_branches,
          "peak_bytes": peak, "out_bytes": out_bytes, "read_bytes": sum(b.bytes_read for b in branches),
          "n_experts": mcfg.n_experts}


# ----------------------------------------------------------------------------------------------------------------
# Driver.

def _subprocess(args: list[str], env_extra: dict) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  res = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, env=env, stdout=subprocess.PIPE,
                       check=True, text=True)
  return json.loads(res.stdout.strip().splitlines()[-1])


def report(results: list[dict], merge: dict | None, command: str, hosts: tuple[str, str]) -> str:
  gb = lambda b: f"{b / 2 ** 30:.2f} GiB"  # noqa: E731
  cell = lambda st: f"{st['s'] * 1e3:.0f} ms ({st['ratio']:.2f}x, {st['lo']:.2f}-{st['hi']:.2f})"  # noqa: E731
  lines = ["# bench_moe: MoE dispatch paths and the merge transform", "",
           f"Command: `{command}` (CPU; 1 and 8 simulated devices via XLA_FLAGS).  ",
           f"Start: {hosts[0]}  ", f"End: {hosts[1]}", "",
           f"One MoE layer, D={D}, F={F}, E={E}, {N_TOKENS} tokens, float32; step = forward + backward w.r.t. "
           "tokens, router and experts. `dense FFN` is one SwiGLU of width k*F: the active FLOPs of top-k. "
           f"The variants of a row run interleaved ({ROUNDS} rounds, alternating order); each cell is the median "
           "time and the median (range) over the rounds of its ratio to the dense FFN of the same round. "
           "At top_k = E the dense and dropless settings both run the wide FFN (one FFN of width E*F, hidden units "
           "scaled by the router). expert_parallel on 8 devices runs on 5 of them (expert=5, since 5 experts cannot "
           "split over 8); on 1 device it is the dropless path.", ""]
  for r in results:
    lines += [f"## {r['devices']} device(s): fp32 matmul peak {r['peak_gflops']:.0f} GFLOP/s", "",
              "| top_k | dense FFN (k*F) | GFLOP/s | dense (all E) | dropless (scanned blocks) | dropless (batched "
              "blocks, gathered weights) | expert_parallel |",
              "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
      base = row["dense_ffn"]["s"]
      get = lambda kind, same="= dropless": cell(row[kind]) if kind in row else same  # noqa: E731
      lines.append(f"| {row['k']} | {base * 1e3:.0f} ms | {row['flops'] / base / 1e9:.0f} | {get('dense')} | "
                   f"{get('dropless')} | {get('dropless_blocked', '(wide FFN)')} | {get('expert_parallel')} |")
    wide = next(row for row in r["rows"] if "dense_split" in row)
    lines += ["", "At top_k = E the wide FFN reads each expert's weights as its own array. Given the stacked "
              "[E, D, F] leaves, as above, each step first copies them into E arrays (and concatenates their "
              "gradients back); the model splits them once per step for all layers, before the layer scan "
              "(`moe.unstack_experts`). "
              f"The wide FFN on separate arrays: {cell(wide['dense_split'])}."]
    lo = r["lora"]
    lines += ["", f"LoRA experts (E={E}: anchor + {E - 1} rank-{RANK} adapters, all active), against one dense FFN "
              "of width F:", "", "| dense FFN (F) | lora side path | lora materialised (previous layout) |",
              "|---|---|---|", f"| {lo['dense_ffn']['s'] * 1e3:.0f} ms | {cell(lo['lora'])} | "
              f"{cell(lo['lora_materialised'])} |", ""]
  if merge is not None:
    m = merge
    lines += [f"## Merge: {m['branches']} SmolLM2-shaped ffn branches -> {m['n_experts']} experts (rule average)", "",
              "| run time | of which producing the leaves (est.) | peak memory | output | peak / output | read |",
              "|---|---|---|---|---|---|",
              f"| {m['seconds']:.1f} s | {m['read_seconds_est']:.1f} s | {gb(m['peak_bytes'])} | {gb(m['out_bytes'])} "
              f"| {m['peak_bytes'] / m['out_bytes']:.2f}x | {gb(m['read_bytes'])} |", ""]
  return "\n".join(lines)


def main():
  if len(sys.argv) > 2 and sys.argv[1] == "--dispatch":
    print(json.dumps(dispatch_worker(int(sys.argv[2]))))
    return
  if len(sys.argv) > 1 and sys.argv[1] == "--merge":
    print(json.dumps(merge_worker()))
    return
  skip_merge = "--no_merge" in sys.argv
  command = " ".join(f"{k}={os.environ[k]}" for k in ("BENCH_MOE_TOKENS", "BENCH_MOE_ROUNDS") if k in os.environ)
  command = (command + " " if command else "") + " ".join(["python experiments/bench_moe.py"] + sys.argv[1:])
  start = host_line()
  results = [_subprocess(["--dispatch", str(n)], {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
             for n in (1, 8)]
  merge = None if skip_merge else _subprocess(["--merge"], {})
  text = report(results, merge, command, (start, host_line()))
  print(text)
  out = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--out=")),
             os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_moe.md"))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
