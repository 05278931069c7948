"""The MoE grouped matmuls and the attention kernels on one device: step time (forward + backward) against the
matmul peak measured in the same run and against the dense equivalent of equal FLOPs, and each kernel's output
against the reference path (the dense dispatch; the xla attention).

  python experiments/bench_kernels.py --dtype=bfloat16 --out=experiments/results/device_check/kernels.md   # GPU
  python experiments/bench_kernels.py --smoke                          # CPU, tiny shapes, seconds: the plumbing

Grouped FFN (`bar_jax.model.dispatch.dropless`, one SwiGLU MoE layer: M tokens, top_k of G experts, D -> F -> D):
each --impls path (scanned = the padded blocks "auto" picks on GPU, ragged = jax.lax.ragged_dot, mosaic_gpu =
Hopper's kernels, megablox = TPU's) against (a) the dense SwiGLU FFN of width top_k * F on the same M tokens, the
same active FLOPs, and (b) the matmul peak of this run. Its output and gradients are compared with
`moe.dense_dispatch` (every expert on every token, the top-k weights; float32 reference).
Attention (`bar_jax.model.attention.self_attention`, packed rows of --segments segments): each --attention kind
against xla (the [B, N, T, T] scores materialised), same inputs; TFLOP/s counts the causal half of QK' and PV.
A path the backend cannot run is reported with its one-line error and the script goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from host import host_line  # noqa: E402


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--tokens", type=int, default=8192, help="M tokens of the grouped FFN")
  ap.add_argument("--d_model", type=int, default=2048)
  ap.add_argument("--d_ff", type=int, default=5632)
  ap.add_argument("--experts", type=int, default=8)
  ap.add_argument("--top_k", type=int, default=2)
  ap.add_argument("--impls", default="scanned,ragged,mosaic_gpu")
  ap.add_argument("--attention", default="xla,cudnn", help="attention kinds (xla is the reference, always run)")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv_heads", type=int, default=16)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--segments", type=int, default=4, help="packed segments per row")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU plumbing check)")
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  if a.smoke:
    a.tokens, a.d_model, a.d_ff, a.experts, a.seq, a.heads, a.kv_heads, a.head_dim, a.rounds = (
        256, 64, 128, 4, 256, 4, 2, 32, 2)
    a.dtype = "float32"
  a.impls = [x for x in a.impls.split(",") if x]
  a.attention = ["xla"] + [x for x in a.attention.split(",") if x and x != "xla"]
  a.command = "python " + " ".join(["experiments/bench_kernels.py"] + list(argv if argv is not None else sys.argv[1:]))
  return a


def _timer(f, *args):
  """Median seconds of the jitted f over rounds (compiled and run once first), and its first output."""
  import jax
  out = jax.block_until_ready(f(*args))

  def run(rounds):
    ts = []
    for _ in range(rounds):
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]
  return run, out


def matmul_peak(dtype, n=8192):
  import jax
  import jax.numpy as jnp
  n = min(n, 2048) if jax.default_backend() == "cpu" else n
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  run, _ = _timer(jax.jit(lambda a: a @ a), a)
  return 2 * n ** 3 / run(5) / 1e12


def _err(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def grouped(a, dtype, peak):
  import jax
  import jax.numpy as jnp
  from bar_jax.model import dispatch, moe
  M, D, F, G, k = a.tokens, a.d_model, a.d_ff, a.experts, a.top_k
  ks = jax.random.split(jax.random.key(1), 6)
  x = jax.random.normal(ks[0], (M, D), jnp.float32)
  logits = jax.random.normal(ks[1], (M, G), jnp.float32)
  w_all = jax.nn.softmax(logits, -1)
  top_w, idx = jax.lax.top_k(w_all, k)
  weights = jnp.zeros_like(w_all).at[jnp.arange(M)[:, None], idx].set(top_w)
  gate = jax.random.normal(ks[2], (G, D, F)) / D ** .5
  up = jax.random.normal(ks[3], (G, D, F)) / D ** .5
  down = jax.random.normal(ks[4], (G, F, D)) / F ** .5
  probe = jax.random.normal(ks[5], (M, D), jnp.float32)

  def loss_of(ffn):
    def loss(x, gate, up, down):
      c = lambda t: t.astype(dtype)  # noqa: E731
      return jnp.sum(ffn(c(x), c(gate), c(up), c(down)).astype(jnp.float32) * probe)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

  flops = 3 * 2 * 3 * M * k * D * F   # 3 matmuls of M*k rows; backward 2x the forward
  rows = []
  dense_w = (gate[:k].transpose(1, 0, 2).reshape(D, k * F), up[:k].transpose(1, 0, 2).reshape(D, k * F),
             down[:k].reshape(k * F, D))
  dense_step = jax.jit(jax.value_and_grad(
      lambda x, g, u, d: jnp.sum((jax.nn.silu(x.astype(dtype) @ g.astype(dtype)) * (x.astype(dtype) @ u.astype(dtype))
                                  @ d.astype(dtype)).astype(jnp.float32) * probe), argnums=(0, 1, 2, 3)))
  dense_run, _ = _timer(dense_step, x, *dense_w)
  t_dense = dense_run(a.rounds)
  rows.append({"path": f"dense SwiGLU, width {k}xF", "s": t_dense, "tflops": flops / t_dense / 1e12,
               "of_peak": flops / t_dense / 1e12 / peak, "vs_dense": 1.0, "err": None})
  ref_step = jax.jit(jax.value_and_grad(
      lambda x, g, u, d: jnp.sum(moe.dense_dispatch(x, weights, g, u, d) * probe), argnums=(0, 1, 2, 3)))
  ref_loss, ref_grads = ref_step(x, gate, up, down)
  for impl in a.impls:
    try:
      step = loss_of(lambda x, g, u, d, impl=impl: dispatch.dropless(x, weights.astype(x.dtype), idx, g, u, d,
                                                                      impl=impl))
      run, (val, grads) = _timer(step, x, gate, up, down)
      t = run(a.rounds)
      # relative error of the loss and of d(x) against the float32 dense reference
      rel = max(abs(float(val) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30),
                float(jnp.linalg.norm(grads[0] - ref_grads[0]) / jnp.linalg.norm(ref_grads[0])))
      rows.append({"path": f"grouped {impl}", "s": t, "tflops": flops / t / 1e12, "of_peak": flops / t / 1e12 / peak,
                   "vs_dense": t / t_dense, "rel_err": rel, "err": None})
    except Exception as e:  # a path this backend cannot compile: reported, the check goes on
      rows.append({"path": f"grouped {impl}", "err": _err(e)})
  return rows


def attention(a, dtype, peak):
  import jax
  import jax.numpy as jnp
  from bar_jax.model import attention as attn
  B, T, N, KV, hd = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
  ks = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(ks[0], (B, T, N, hd), jnp.float32).astype(dtype)
  kk = jax.random.normal(ks[1], (B, T, KV, hd), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, T, KV, hd), jnp.float32).astype(dtype)
  seg_len = T // a.segments
  seg = (jnp.arange(T) // seg_len + 1).astype(jnp.int32)[None].repeat(B, 0)
  pos = (jnp.arange(T) % seg_len).astype(jnp.int32)[None].repeat(B, 0)
  probe = jax.random.normal(ks[3], (B, T, N, hd), jnp.float32)
  # causal within segments: QK' and PV over the lower triangle of each segment, forward x 3 with the backward
  flops = 3 * 2 * 2 * B * N * hd * a.segments * seg_len * (seg_len + 1) / 2
  rows, ref = [], None
  for kind in a.attention:
    try:
      step = jax.jit(jax.value_and_grad(
          lambda q, k, v, kind=kind: jnp.sum(attn.self_attention(q, k, v, pos, seg, kind).astype(jnp.float32)
                                             * probe), argnums=(0, 1, 2)))
      run, (val, grads) = _timer(step, q, kk, v)
      t = run(a.rounds)
      picked = attn.pick(kind, None, T, dtype)
      row = {"path": f"attention {kind}" + (f" (runs {picked})" if picked != kind else ""), "s": t,
             "tflops": flops / t / 1e12, "of_peak": flops / t / 1e12 / peak, "err": None}
      if ref is None:
        ref = (val, grads[0])
        row["vs_dense"], row["rel_err"] = 1.0, 0.0
      else:
        row["vs_dense"] = t / rows[0]["s"]
        row["rel_err"] = float(jnp.linalg.norm((grads[0] - ref[1]).astype(jnp.float32))
                               / jnp.linalg.norm(ref[1].astype(jnp.float32)))
      rows.append(row)
    except Exception as e:
      rows.append({"path": f"attention {kind}", "err": _err(e)})
  return rows


def report(a, device, peak, sections, hosts) -> str:
  lines = ["# bench_kernels: grouped matmuls and attention kernels", "", f"Made by: `{a.command}`.", "",
           f"Device: {device}; dtype {a.dtype}; matmul peak measured here {peak:.3g} TFLOP/s. {hosts[0]}", "",
           f"Grouped FFN: M={a.tokens} tokens, top_k={a.top_k} of G={a.experts}, D={a.d_model}, F={a.d_ff}; "
           "forward + backward (d x, d W). Attention: "
           f"B={a.batch}, T={a.seq} in {a.segments} packed segments, {a.heads} heads ({a.kv_heads} KV) x "
           f"{a.head_dim}; forward + backward (d q, d k, d v). vs ref = time / the section's first row (the dense "
           "SwiGLU of equal FLOPs; xla attention); rel. err = |d x - ref| / |ref| against the float32 dense "
           "dispatch (attention: against xla in the same dtype).", "",
           "| path | ms | TFLOP/s | of peak | vs ref | rel. err |", "|---|---|---|---|---|---|"]
  for rows in sections:
    for r in rows:
      if r.get("err"):
        lines.append(f"| {r['path']} | failed: {r['err']} | | | | |")
      else:
        err = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else ""
        lines.append(f"| {r['path']} | {r['s'] * 1e3:.2f} | {r['tflops']:.3g} | {r['of_peak']:.0%} | "
                     f"{r['vs_dense']:.2f}x | {err} |")
  return "\n".join(lines + ["", hosts[1], ""])


def main(argv=None):
  a = parse(argv)
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(a.dtype)
  start = host_line()
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  peak = matmul_peak(dtype)
  sections = [grouped(a, dtype, peak), attention(a, dtype, peak)]
  text = report(a, device, peak, sections, (start, host_line()))
  print(text)
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      f.write(text)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
      json.dump({"command": a.command, "device": device, "peak_tflops": peak, "rows": sections}, f, indent=1)
  failed = [r["path"] for rows in sections for r in rows if r.get("err")]
  if failed:
    print(f"bench_kernels: {len(failed)} paths did not run ({', '.join(failed)}); see the table", file=sys.stderr)


if __name__ == "__main__":
  main()
