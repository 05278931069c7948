"""Ahead-of-time compile of every stage's step for a real target, from a CPU-only machine: does it fit, what does it
cost. One row per (target, model, stage, remat, dispatch, attention): per-device peak against the target's memory,
XLA's flops per device where it reports them, compile time.

  python experiments/aot_targets.py --target=cpu                      # 8 simulated CPU devices (no extras)
  ../venv-accel/bin/python experiments/aot_targets.py --target=tpu:v5:2x2x2 --out=experiments/results/aot_targets.md
  ../venv-accel/bin/python experiments/aot_targets.py --target=gpu:h100x8 --cases=olmo2_7b/moe5_sft --out=...
  ../venv-accel/bin/python experiments/aot_targets.py --target=tpu:v5:2x2x2 --kernels --out=...   # dispatch ops

TPU and GPU targets need the accelerator extras (requirements-tpu.txt, requirements-gpu.txt), installed in their
own environment by `bash setup.sh tpu gpu` (../venv-accel). Targets: bar_jax/targets.py. Rows are kept in the
--out file's JSON twin (aot_targets.json) by key, so runs for several targets build one table; a re-run replaces
its own rows; `--render` rewrites the table from them.

Nothing is allocated: parameters (fp32 masters), AdamW state and batch are ShapeDtypeStructs carrying the
NamedShardings of the mesh the launch recipes use (experiments/launch/: fsdp = the 8 devices of a node or slice),
and each step is the training loop's own (`loop.make_step` over the stage's freeze partition), jitted with the
trainable leaves and optimiser state donated. Decode is one `transformer.forward_cached` token step over a full
KV cache. "dropless" runs the grouped matmul `dispatch` picks for the target ("auto"); at top_k = E the MoE runs
as the wide FFN whatever the dispatch, so branch rows have one dispatch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

from bar_jax import targets  # imports no jax: the environment is set first

if "jax" not in sys.modules:
  targets.prepare_environment()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from bar_jax import optim, pytree, sharding  # noqa: E402
from bar_jax.model import dispatch, transformer  # noqa: E402
from bar_jax.model.config import Compute, ModelConfig  # noqa: E402
from bar_jax.stages import loop  # noqa: E402
from bar_jax.transforms import freeze  # noqa: E402
from configs.common import opt_defaults  # noqa: E402

GB = 1e9
# OLMo-2-1124-7B (the paper's base) and OLMo-2-0425-1B, as bar_jax.io.hf imports their config.json: 100k
# vocabulary, QK RMSNorm over the whole projections, norms after each sub-layer, untied head.
OLMO2_7B = ModelConfig(vocab_size=100352, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                       d_ff=11008, tie_embeddings=False, rope_theta=500000.0, rms_eps=1e-6, qk_norm="proj",
                       norm_position="post", max_seq_len=4096)
OLMO2_1B = OLMO2_7B.replace(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, d_ff=8192)
MODELS = {"olmo2_7b": OLMO2_7B, "olmo2_1b": OLMO2_1B}


@dataclasses.dataclass(frozen=True)
class Stage:
  n_experts: int
  schedule: str        # a freeze.SCHEDULE key; "decode": one generate step
  top_k: int = 0       # 0: every expert (the wide FFN)


# The stages' steps: a branch (anchor + 1 expert) in SFT and RL, the 5-expert merged MoE at top-4 (the default
# run's routing) training only its router, and with experts, router and embeddings trainable (SFT of the merged
# MoE; the upgrade stage's step trains a subset of the same leaves), and decoding.
STAGES = {"branch_sft": Stage(2, "sft"), "branch_rl": Stage(2, "rl"), "moe5_router": Stage(5, "router", 4),
          "moe5_sft": Stage(5, "sft", 4), "moe5_decode": Stage(5, "decode", 4)}
MESH = (1, 8, 1, 1)    # (data, fsdp, expert, tensor): one 8-GPU node, one 8-chip slice (the recipes' fsdp)
BATCH, SEQ = 8, 4096   # one 4096-token sequence per device
DECODE_SLOTS = 64      # decode: 8 sequences per device, a 4096-column KV cache


@dataclasses.dataclass(frozen=True)
class Case:
  model: str
  stage: str
  remat: str = "full"
  dispatch: str = "dense"
  attention: str = "xla"

  @property
  def key(self) -> str:
    return f"{self.model}/{self.stage}/{self.remat}/{self.dispatch}/{self.attention}"


def default_cases(platform: str) -> list[Case]:
  """What the table holds, 7B and 1B: every training stage at remat none, full and dots (RL: full and dots), both
  dispatches where top_k < E; on GPU with cuDNN attention (what the recipe runs), plus XLA attention for the branch
  step."""
  out = []
  for model in MODELS:
    for stage, s in STAGES.items():
      dispatches = ("dense", "dropless") if s.top_k and s.top_k < s.n_experts else ("dense",)
      remats = {"decode": ("none",), "rl": ("full", "dots")}.get(s.schedule, ("none", "full", "dots"))
      attentions = ("cudnn",) if platform == "gpu" else ("xla",)
      if platform == "gpu" and stage == "branch_sft":
        attentions = ("cudnn", "xla")
      for remat in remats:
        for d in dispatches:
          for a in attentions:
            out.append(Case(model, stage, remat, d, a))
  return out


def _abstract(shapes: dict, shardings: dict) -> dict:
  return {k: jax.ShapeDtypeStruct(shapes[k].shape, shapes[k].dtype, sharding=shardings[k]) for k in shapes}


def _lower_train(cfg, compute, mesh, schedule):
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), transformer.param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  part = freeze.make_partition(shapes, cfg, freeze.SCHEDULE[schedule])
  full = pytree.flatten(transformer.param_shardings(cfg, mesh, shapes))
  t_shapes, f_shapes = jax.eval_shape(lambda p: freeze.split(p, part), shapes)
  trainable = _abstract(t_shapes, {k: sharding.slice_sharding(full[k], v) for k, v in t_shapes.items()})
  frozen = _abstract(f_shapes, {k: sharding.slice_sharding(full[k], v) for k, v in f_shapes.items()})
  tx, _ = optim.adamw(opt_defaults(lr=1e-5), 1000)
  opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                           jax.eval_shape(tx.init, trainable), sharding.opt_state_shardings(tx, trainable, mesh))
  bspec = NamedSharding(mesh, P(None, sharding.BATCH_AXES, None))
  tok = jax.ShapeDtypeStruct((1, BATCH, SEQ), jnp.int32, sharding=bspec)
  batch = {"inputs": tok, "targets": tok, "positions": tok, "segment_ids": tok,
           "mask": jax.ShapeDtypeStruct(tok.shape, jnp.float32, sharding=bspec)}
  step = loop.make_step(loop.lm_loss(cfg, mesh, compute=compute), tx, part, accum=1)
  keep = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
  return jax.jit(step, donate_argnums=(0, 1), out_shardings=(keep(trainable), keep(opt_state), None)).lower(
      trainable, opt_state, frozen, batch)


def _lower_decode(cfg, compute, mesh):
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), transformer.param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        transformer.param_shardings(cfg, mesh, shapes))
  B, S = DECODE_SLOTS, SEQ
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  kv = jax.ShapeDtypeStruct((cfg.n_layers, B, S, cfg.n_kv_heads, cfg.head_dim), jnp.bfloat16,
                            sharding=NamedSharding(mesh, P(None, sharding.BATCH_AXES)))
  cache = {"k": kv, "v": kv, "index": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))}
  col = jax.ShapeDtypeStruct((B, 1), jnp.int32, sharding=rows)
  valid = jax.ShapeDtypeStruct((B, S), jnp.bool_, sharding=rows)

  def step(params, cache, tokens, positions, valid):
    logits, cache = transformer.forward_cached(params, tokens, cache, cfg, compute=compute, positions=positions,
                                               kv_valid=valid, mesh=mesh, ring=True)
    return jnp.argmax(logits[:, -1], -1), cache
  return jax.jit(step, donate_argnums=(1,)).lower(params, cache, col, col, valid)


def run_case(case: Case, target: targets.Target) -> dict:
  s = STAGES[case.stage]
  cfg = MODELS[case.model].replace(ffn="moe", n_experts=s.n_experts, top_k=s.top_k, norm_topk=bool(s.top_k))
  compute = Compute(dtype="bfloat16", remat=case.remat, dispatch=case.dispatch, attention=case.attention)
  mesh = sharding.make_mesh(MESH, devices=target.devices)
  t0 = time.time()
  try:
    lowered = _lower_decode(cfg, compute, mesh) if s.schedule == "decode" else _lower_train(cfg, compute, mesh,
                                                                                            s.schedule)
    compiled = lowered.compile()
  except Exception as e:  # a program XLA refuses (out of memory at compile time, an unsupported kernel): a row too
    return dict(key=case.key, target=target.name, hbm=target.hbm,
                error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", compile_s=time.time() - t0)
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  peak = targets.peak_bytes(compiled)
  impl = dispatch.auto_impl(mesh) if case.dispatch != "dense" and s.top_k not in (0, s.n_experts) else ""
  return dict(key=case.key, target=target.name, kind=target.kind, hbm=target.hbm, mesh=MESH,
              args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes, peak=peak, fits=peak <= target.hbm,
              flops=targets.flops(compiled), compile_s=seconds, impl=impl)


# ----------------------------------------------------------------------------------------------------------------
# The dispatch kernels on their own (--kernels): the grouped matmul's flops and the grouped FFN's largest buffer.

KERNEL_SHAPE = dict(m=8192, k=2048, n=5632, groups=8)   # one MoE FFN projection: 8192 token copies, D=2048, F=5632


def kernel_rows(target: targets.Target) -> list[dict]:
  out = []
  impls = {"tpu": ("megablox", "ragged"), "gpu": ("scanned", "blocked", "ragged"),
           "cpu": ("scanned", "blocked", "ragged")}[target.platform]
  m, k, n, g = (KERNEL_SHAPE[x] for x in ("m", "k", "n", "groups"))
  for impl in impls:
    t0 = time.time()
    row = dict(key=f"kernel/{impl}", target=target.name, kind=target.kind, impl=impl)
    if impl in ("megablox", "ragged"):
      row.update(targets.grouped_matmul_costs(target.name, impl, m=m, k=k, n=n, groups=g))
    row.update(targets.grouped_ffn_temps(target.name, impl, m=m, d=k, f=n, groups=g))
    row["compile_s"] = time.time() - t0
    out.append(row)
  # expert_parallel over (fsdp 4, expert 2), 4 experts, top-2: the exchange "auto" uses on this target, and the
  # ragged one (ragged_all_to_all + ragged_dot), forward + gradient of one layer.
  mesh = sharding.make_mesh((1, 4, 2, 1), devices=target.devices[:8])
  tokens, e = m // 2, 4
  tok = NamedSharding(mesh, P(sharding.BATCH_AXES))
  exp = NamedSharding(mesh, P("expert"))
  args = [jax.ShapeDtypeStruct((tokens, k), jnp.bfloat16, sharding=tok),
          jax.ShapeDtypeStruct((tokens, e), jnp.bfloat16, sharding=tok),
          jax.ShapeDtypeStruct((tokens, 2), jnp.int32, sharding=tok)] + [
      jax.ShapeDtypeStruct(shape, jnp.float32, sharding=exp) for shape in ((e, k, n), (e, k, n), (e, n, k))]
  for impl in dict.fromkeys((dispatch.auto_impl(mesh), "ragged")):
    def loss(x, gate, up, down, weights, idx, impl=impl):
      y, _ = dispatch.expert_parallel(x, weights, idx, gate, up, down, mesh, 0.0, impl=impl,
                                      interpret=target.platform == "cpu")
      return jnp.sum(y.astype(jnp.float32))
    t0 = time.time()
    row = dict(key=f"kernel/ep_{impl}", target=target.name, kind=target.kind, impl=f"expert_parallel {impl}")
    try:
      x, weights, idx, gate, up, down = args
      c = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(x, gate, up, down, weights, idx).compile()
      row.update(temp=c.memory_analysis().temp_size_in_bytes, largest_temp_elems=targets.largest_array(c.as_text()),
                 grad_flops=targets.flops(c))
    except Exception as err:  # XLA:CPU has no ragged_all_to_all
      row.update(error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    row["compile_s"] = time.time() - t0
    out.append(row)
  return out


# ----------------------------------------------------------------------------------------------------------------
# The table.

def _fmt_flops(f):
  return "n/a" if f is None else f"{f / 1e12:.3g}"


def render(rows: list[dict], commands: list[str]) -> str:
  steps = [r for r in rows if not r["key"].startswith("kernel/")]
  kernels = [r for r in rows if r["key"].startswith("kernel/")]
  lines = ["# AOT compile for real targets: every stage's step, per device", "",
           "Commands (each adds or replaces its own rows):", ""] + [f"    {c}" for c in commands] + [
      "", f"jax {jax.__version__}; compiled on a 2-core CPU host with no accelerator (bar_jax/targets.py). "
      f"Mesh (data, fsdp, expert, tensor) = {MESH}, the recipes' fsdp over one node or slice; bf16 compute, fp32 "
      f"master weights, AdamW (fp32 mu, nu); {BATCH} x {SEQ} tokens per training step (one sequence per device); "
      f"decode: one token for {DECODE_SLOTS} slots over a {SEQ}-column KV cache (bf16 weights). peak = XLA "
      "arguments + outputs - donated aliases + temporaries (`memory_analysis()`); usable = the target's HBM per "
      f"device (GPU: x {targets.GPU_MEM_FRACTION}, the recipe's XLA_PYTHON_CLIENT_MEM_FRACTION; TPU v5p: Google's "
      "95 GB, while XLA:TPU's own limit is 95.74 GiB); TFLOP = "
      "`cost_analysis()` per device (XLA:GPU reports none). MoE rows route top-4 of 5 (renormalised); "
      "`dropless` runs the grouped matmul `dispatch.auto_impl` picks for the target.", "",
      "| target | model | stage | remat | dispatch | attention | peak GB/dev | temp GB | usable GB | fits | "
      "TFLOP/dev | compile s |", "|" + "---|" * 12]
  order = {k: i for i, k in enumerate(STAGES)}
  hbm = {r["target"]: r["hbm"] for r in steps if "hbm" in r}
  remats = {"none": 0, "full": 1, "dots": 2}

  def sort_key(r):
    model, stage, remat, disp, attn = r["key"].split("/")
    return r["target"], model != "olmo2_7b", order.get(stage, 99), remats.get(remat, 9), disp, attn
  for r in sorted(steps, key=sort_key):
    model, stage, remat, disp, attn = r["key"].split("/")
    disp = f"{disp} ({r['impl']})" if r.get("impl") else disp
    if "error" in r:
      need = re.search(r"temporaries \(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", r["error"])
      verdict = (f"**NO**: XLA refuses to compile, {need.group(1)} of temporaries for {need.group(2)} of HBM" if need
                 else f"**compile failed**: {r['error']}")
      lines.append(f"| {r['target']} | {model} | {stage} | {remat} | {disp} | {attn} | - | - | "
                   f"{hbm.get(r['target'], 0) / GB:.1f} | {verdict} | - | {r['compile_s']:.0f} |")
      continue
    lines.append(f"| {r['target']} | {model} | {stage} | {remat} | {disp} | {attn} | {r['peak'] / GB:.2f} | "
                 f"{r['temp'] / GB:.2f} | {r['hbm'] / GB:.1f} | {'yes' if r['fits'] else '**NO**'} | "
                 f"{_fmt_flops(r['flops'])} | {r['compile_s']:.0f} |")
  lines += _recommendations(steps) + ["", NOTES.strip()] if steps else []
  if kernels:
    s = KERNEL_SHAPE
    lines += ["", f"## The grouped matmul per target (bf16, M = {s['m']} sorted token copies, D = {s['k']}, "
              f"F = {s['n']}, G = {s['groups']} experts, one device)", "",
              "matmul: one x [M, D] @ w [G, D, F] (`dispatch.grouped_matmul`), forward and gradient (d(x), d(W)). "
              "FFN: `dispatch.dropless` (SwiGLU, top-2), forward + gradient (expert_parallel rows: one layer over "
              "fsdp 4 x expert 2, E = 4, M/2 tokens, per device); largest array = the biggest shape "
              f"anywhere in the compiled program, against G x M x F = {s['groups'] * s['m'] * s['n'] / 1e6:.0f}M "
              "elements (a densifying path has one).", "",
              "| target | impl | matmul fwd TFLOP | matmul grad TFLOP | grad / fwd | FFN temp MiB | "
              "FFN largest array (M elems) | no G x M x F array | compile s |", "|" + "---|" * 9]
    gmf = s["groups"] * s["m"] * s["n"]
    for r in kernels:
      if "error" in r:
        lines.append(f"| {r['target']} | {r['impl']} | compile failed: {r['error']} | | | | | | {r['compile_s']:.0f} |")
        continue
      ratio = (f"{r['grad_flops'] / r['fwd_flops']:.2f}" if r.get("fwd_flops") and r.get("grad_flops")
               else "n/a")
      lines.append(f"| {r['target']} | {r['impl']} | {_fmt_flops(r.get('fwd_flops'))} | "
                   f"{_fmt_flops(r.get('grad_flops'))} | {ratio} | {r['temp'] / 2**20:.0f} | "
                   f"{r['largest_temp_elems'] / 1e6:.1f} | {'yes' if r['largest_temp_elems'] < gmf else '**no**'} | "
                   f"{r['compile_s']:.0f} |")
  return "\n".join(lines) + "\n"


NOTES = """
What the table says (2026-12-07; the rows above are the evidence):

- **The 5-expert MoE with experts trainable (SFT of the merged MoE; the upgrade stage trains a subset of its
  leaves) needs remat=full on 8 H100s at fsdp=8**: 46.70 GB (dense) / 49.40 GB (dropless) per GPU, against 83.55 /
  83.98 GB at remat=dots, over the 78.7 GB usable. The SLURM recipe therefore runs remat=full; a branch fits at dots
  (36.38 GB SFT, 39.68 GB RL) and, with cuDNN attention, even at none (45.09 GB). On 8 v5p chips a branch (43.38 GB
  SFT, 49.05 GB RL) and the router step (65.27 GB dense) fit at dots, so the TPU recipe keeps dots; the 5-expert SFT
  step at dots does not with the wide FFN (95.54 GB, over the 95 GB of a chip and within 0.2% of XLA:TPU's own
  limit) and fits with megablox (60.43 GB) or at remat=full (54.22 GB dense, 18.8 TFLOP per chip against 19.8 for
  megablox at dots): MoE SFT and upgrade runs on TPU pass remat=full.
- **Attention dominates the activations at 4096 tokens**: the branch step without remat is 150.72 GB per H100 with
  XLA attention and 45.09 GB with cuDNN's; on v5p splash attention takes the branch step at dots from 43.38 to
  37.39 GB and from 4.75 to 3.77 TFLOP per chip.
- **The grouped matmul** (last table): on TPU megablox's gradient is 2.00x its forward in flops, ragged_dot's 9.00x
  (its weight gradient is a dense masked product over all groups); on an H100 ragged_dot (a G x M x F array) and the
  gathered-weights "blocked" path (1.2 x G x M x F) densify, the scanned blocks do not. At top-4 of 5 on H100,
  dropless (scanned) moves the peak by 6% or less against the wide FFN with remat and costs far more without it
  (115.98 against 63.68 GB for the router step). On v5p, dropless (megablox) halves the router step's peak at dots
  (30.99 against 65.27 GB) but doubles its flops (15.2 against 7.4 TFLOP): the layer's dots policy saves dot
  outputs, and a pallas_call is not one, so the grouped matmuls are recomputed in the backward pass (naming their
  outputs for the policy, as the wide FFN's projections are, is the fix). dispatch=dense, the stage configs'
  default, stays right for k close to E.
- Compile times are on a 2-core CPU shared with other jobs (a v5p 7B step: 200-570 s, an H100 7B step: 50-90 s).
  No autotuning runs deviceless, so an on-device compile can choose other kernels; real out-of-memory margins
  (allocator, NCCL and cuDNN workspaces) need a device.
"""


def _recommendations(steps: list[dict]) -> list[str]:
  """Per target, model and stage: the remat settings that fit, and the one to use (the first that fits of none,
  dots, full: least recomputation first), over the stage's rows with the recipe's attention."""
  fits: dict[tuple, dict[str, bool]] = {}
  for r in steps:
    model, stage, remat, disp, attn = r["key"].split("/")
    if STAGES[stage].schedule == "decode":
      continue
    ok = "error" not in r and r["fits"]
    cell = fits.setdefault((r["target"], model, stage, attn), {})
    cell[remat] = cell.get(remat, False) or ok        # fits with some dispatch
  if not fits:
    return []
  out = ["", "Remat per stage (a setting fits when some dispatch of it fits; use = the first that fits of none, "
         "dots, full):", "", "| target | model | stage | attention | fits | use |", "|---|---|---|---|---|---|"]
  for (target, model, stage, attn), cell in sorted(fits.items()):
    use = next((m for m in ("none", "dots", "full") if cell.get(m)), "nothing measured fits")
    listed = ", ".join(f"{m} {'yes' if cell[m] else 'no'}" for m in ("none", "dots", "full") if m in cell)
    out.append(f"| {target} | {model} | {stage} | {attn} | {listed} | {use} |")
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--target", default="cpu", help="cpu | tpu:<topology> | gpu:h100x<n> (bar_jax/targets.py)")
  ap.add_argument("--cases", default="", help="comma-separated key prefixes (model/stage/remat/dispatch/attention), "
                                              "e.g. olmo2_7b/moe5_sft,olmo2_1b; default: every case")
  ap.add_argument("--kernels", action="store_true", help="the dispatch kernels instead of the stage steps")
  ap.add_argument("--attention", default="", help="run the cases with this attention instead (e.g. auto: splash "
                                                  "on TPU, bar_jax/model/attention.py)")
  ap.add_argument("--out", default="", help="markdown table; its rows are kept in the .json beside it")
  ap.add_argument("--render", action="store_true", help="only rewrite --out from its stored rows")
  args = ap.parse_args()
  if args.render:
    saved = json.load(open(os.path.splitext(args.out)[0] + ".json"))
    with open(args.out, "w") as f:
      f.write(render(saved["rows"], saved["commands"]))
    return
  target = targets.get(args.target)
  store = os.path.splitext(args.out)[0] + ".json" if args.out else ""
  command = "python experiments/aot_targets.py " + " ".join(sys.argv[1:])
  mine = {}

  def save():
    """Merge this run's rows into the stored ones (another target's run may be writing beside this one)."""
    if not store:
      return
    saved = json.load(open(store)) if os.path.exists(store) else {"rows": [], "commands": []}
    rows = {(r["target"], r["key"]): r for r in saved["rows"]} | mine
    commands = [c for c in saved["commands"] if c != command] + [command]
    for path, text in ((store, json.dumps({"rows": list(rows.values()), "commands": commands}, indent=1)),
                       (args.out, render(list(rows.values()), commands))):
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)

  if args.kernels:
    for r in kernel_rows(target):
      mine[(r["target"], r["key"])] = r
      print(json.dumps(r), flush=True)
    save()
    return
  prefixes = [p for p in args.cases.split(",") if p]
  cases = default_cases(target.platform)
  if args.attention:
    cases = list(dict.fromkeys(dataclasses.replace(c, attention=args.attention) for c in cases))
  for case in cases:
    if prefixes and not any(case.key.startswith(p) for p in prefixes):
      continue
    r = run_case(case, target)
    mine[(r["target"], r["key"])] = r
    print(json.dumps({k: v for k, v in r.items() if k != "mesh"}), flush=True)
    save()  # after every row: a long run stopped half-way keeps what it compiled
  if not store:
    print(render(list(mine.values()), [command]))


if __name__ == "__main__":
  main()
