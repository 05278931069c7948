"""Compile targets for ahead-of-time checks from a CPU-only machine: the devices of a TPU topology or of 8 H100s,
which `jit(...).lower(...).compile()` compiles for without any accelerator present (MaxText's train_compile.py
works the same way), and what each device holds.

  cpu              the local (simulated) CPU devices
  tpu:<topology>   a TPU topology by libtpu's name: "v5:2x2x2" (v5p-16, 8 chips), "v5:4x4x4" (v5p-128),
                   "v5e:4x4", "v5e:16x16" (v5e-256); needs libtpu (requirements-tpu.txt)
  gpu:h100x<n>     n H100 SXM 80 GB on one host; needs jax-cuda12-plugin + jax-cuda12-pjrt (requirements-gpu.txt)

`prepare_environment()` must run before jax is imported: the compile-only TPU client must not look for TPU VM
metadata, and the CPU stays the default backend. No autotuning runs deviceless on the GPU, so kernel choices (and
possibly workspace sizes) can differ from an on-device compile; cost_analysis() is None for XLA:GPU.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1 << 30

# H100 SXM5 80 GB (NVIDIA's H100 datasheet and CUDA's device query for compute capability 9.0): what XLA:GPU's
# compiler reads from a GpuTargetConfigProto in place of a live device. Written here field by field; the format is
# xla/stream_executor's GpuTargetConfigProto as jaxlib 0.10.2 parses it.
H100_SXM = {
    "threads_per_block_limit": 1024, "threads_per_warp": 32,
    "shared_memory_per_block": 48 * 1024, "shared_memory_per_core": 228 * 1024,
    "shared_memory_per_block_optin": 227 * 1024,
    "threads_per_core_limit": 2048, "core_count": 132, "fpus_per_core": 128,
    "block_dim_limit_x": 2 ** 31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
    "thread_dim_limit_x": 1024, "thread_dim_limit_y": 1024, "thread_dim_limit_z": 64,
    "memory_bandwidth": 3_352_000_000_000, "l2_cache_size": 50 * 1024 * 1024, "clock_rate_ghz": 1.98,
    "device_memory_size": 81559 * 1024 * 1024,                # 81559 MiB, as nvidia-smi reports an H100 80GB HBM3
    "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
}
# The launch recipes' XLA_PYTHON_CLIENT_MEM_FRACTION (experiments/launch/slurm_gpu.sbatch): the share of a GPU's
# memory jax may use.
GPU_MEM_FRACTION = 0.92
# HBM per TPU chip by device kind (Google's TPU system architecture pages, in GB).
TPU_HBM = {"TPU v4": 32e9, "TPU v5 lite": 16e9, "TPU v5": 95e9, "TPU v6 lite": 32e9}


def h100_target_config(cudnn=(9, 8, 0)) -> str:
  """The GpuTargetConfigProto text of an H100 SXM 80 GB (cuDNN version as installed by requirements-gpu.txt)."""
  info = "\n".join(f"  {k}: {v}" for k, v in H100_SXM.items())
  return (f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n"
          f'platform_name: "CUDA"\n'
          f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}\n"
          f'device_description_str: "NVIDIA H100 80GB HBM3"\n')


def prepare_environment() -> None:
  """Before jax is imported: the CPU as the default backend, no TPU VM metadata queries (compile-only TPU)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


@dataclasses.dataclass(frozen=True)
class Target:
  name: str                 # as given: "cpu", "tpu:v5:2x2x2", "gpu:h100x8"
  platform: str             # "cpu" | "tpu" | "gpu"
  devices: tuple            # the devices to build a mesh from
  hbm: float                # bytes one device may use
  kind: str                 # device kind, e.g. "TPU v5"


def get(name: str) -> Target:
  """The devices and per-device memory of a target named as in the module docstring."""
  from jax.experimental import topologies
  import jax
  if name == "cpu":
    devs = tuple(jax.devices("cpu"))
    return Target(name, "cpu", devs, 80e9, "cpu (simulated; judged against an 80 GB device)")
  if name.startswith("tpu:"):
    # Compile-only: several processes may hold libtpu at once (pytest workers, a table run beside a test); without
    # this the second one fails on libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devs = tuple(topologies.get_topology_desc(topology_name=name[4:], platform="tpu").devices)
    kind = devs[0].device_kind
    if kind not in TPU_HBM:
      raise ValueError(f"unknown TPU device kind {kind!r}: add its HBM to bar_jax.targets.TPU_HBM")
    return Target(name, "tpu", devs, TPU_HBM[kind], kind)
  m = re.fullmatch(r"gpu:h100x(\d+)", name)
  if m:
    devs = tuple(topologies.get_topology_desc(platform="cuda", topology=f"1x1x{m.group(1)}",
                                              target_config=h100_target_config()).devices)
    return Target(name, "gpu", devs, GPU_MEM_FRACTION * H100_SXM["device_memory_size"], devs[0].device_kind)
  raise ValueError(f"unknown target {name!r}: use cpu, tpu:<topology> (e.g. tpu:v5:2x2x2) or gpu:h100x<n>")


def peak_bytes(compiled) -> int:
  """Per-device peak of a compiled program: arguments + outputs - donated aliases + temporaries."""
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def flops(compiled) -> float | None:
  """XLA's flop count per device, or None where the backend reports none (XLA:GPU)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


_SHAPE = re.compile(r"\b(?:bf16|f16|f32|s32|u32|s8|u8|pred)\[([\d,]+)\]")


def largest_array(hlo_text: str) -> int:
  """Elements of the largest array shape anywhere in an HLO module's text (parameters, temporaries, outputs)."""
  return max((math.prod(int(d) for d in dims.split(",")) for dims in _SHAPE.findall(hlo_text)), default=0)


def _one_device(target: Target, *shapes_dtypes):
  import jax
  sh = jax.sharding.SingleDeviceSharding(target.devices[0])
  return [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in shapes_dtypes]


def grouped_matmul_costs(target_name: str, impl: str, *, m: int, k: int, n: int, groups: int) -> dict:
  """One bf16 grouped matmul x [m, k] @ w [groups, k, n] on one device of the target: flops and temporaries of
  the forward pass and of the gradient (d(x) and d(W) only)."""
  import jax
  import jax.numpy as jnp
  from bar_jax.model import dispatch
  t = get(target_name)
  x, w, sizes = _one_device(t, ((m, k), jnp.bfloat16), ((groups, k, n), jnp.bfloat16), ((groups,), jnp.int32))
  mm = lambda x, w, s: dispatch.grouped_matmul(x, w, s, impl, interpret=False)  # noqa: E731
  fwd = jax.jit(mm).lower(x, w, sizes).compile()
  grad = jax.jit(jax.grad(lambda x, w, s: jnp.sum(mm(x, w, s).astype(jnp.float32)), argnums=(0, 1))).lower(
      x, w, sizes).compile()
  return {"fwd_flops": flops(fwd), "grad_flops": flops(grad),
          "fwd_temp": fwd.memory_analysis().temp_size_in_bytes, "grad_temp": grad.memory_analysis().temp_size_in_bytes,
          "largest_elems": max(largest_array(fwd.as_text()), largest_array(grad.as_text()))}


def grouped_ffn_temps(target_name: str, impl: str, *, m: int, d: int, f: int, groups: int, top_k: int = 2) -> dict:
  """dispatch.dropless (m = tokens * top_k sorted copies through SwiGLU experts [groups, d, f]) on one device,
  forward + gradient w.r.t. tokens and experts: temporaries and the largest array in the compiled program."""
  import jax
  import jax.numpy as jnp
  from bar_jax.model import dispatch
  t = get(target_name)
  tokens = m // top_k
  x, weights, idx, gate, up, down = _one_device(
      t, ((tokens, d), jnp.bfloat16), ((tokens, groups), jnp.bfloat16), ((tokens, top_k), jnp.int32),
      ((groups, d, f), jnp.float32), ((groups, d, f), jnp.float32), ((groups, f, d), jnp.float32))

  def loss(x, gate, up, down, weights, idx):
    y = dispatch.dropless(x, weights, idx, gate, up, down, impl=impl, interpret=False)
    return jnp.sum(y.astype(jnp.float32))
  c = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(x, gate, up, down, weights, idx).compile()
  return {"temp": c.memory_analysis().temp_size_in_bytes, "largest_temp_elems": largest_array(c.as_text()),
          "flops": flops(c)}
