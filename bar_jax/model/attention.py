"""Self-attention over packed rows, per backend: `Compute.attention` = "xla" | "cudnn" | "splash" | "auto".

  xla     jax.nn.dot_product_attention with the dense boolean mask (causal by position, within one segment): the
          [B, N, T, T] scores are materialised (4 GiB per layer for one 4096-token sequence of a 7B model).
  cudnn   cuDNN's fused flash attention (GPU, bf16/fp16). Rows without segment ids use `is_causal=True` (no mask
          tensor; cuDNN skips the masked blocks). Packed rows still pass the dense mask, which jax turns into a
          [B, 1, T, T] bias whose gradient cuDNN also computes: jax 0.10.2 has no public segment-id path to cuDNN
          (its private API takes q/kv offsets: the next step).
  splash  Pallas splash attention (TPU; `jax.experimental.pallas.ops.tpu.splash_attention`): causal by index plus
          segment ids, so packed rows never build a mask tensor. Run per batch shard under shard_map. Causal by
          index equals causal by position where each segment's positions count up from its start, which is how
          the data pipeline packs rows. In interpret mode on the CPU (tests only).
  auto    splash on TPU, cudnn on GPU (bf16/fp16 only), xla elsewhere or where the kernel does not apply (a
          sequence that is not a multiple of 128 tokens for splash; float32 for cuDNN).

The KV-cache paths (prefill into a cache, decode) keep the xla path: their masks are over cache slots.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from bar_jax.model import dispatch

BATCH_AXES = ("data", "fsdp", "expert")
KINDS = ("xla", "cudnn", "splash", "auto")


def pick(kind: str, mesh, seq_len: int, dtype) -> str:
  """The attention kernel that runs: "auto" resolved for the mesh's platform (dispatch.platform), and a kernel
  that cannot take these inputs replaced by xla."""
  platform = dispatch.platform(mesh)
  if kind == "auto":
    kind = {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")
    if kind == "splash" and seq_len % 128:
      kind = "xla"
    if kind == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      kind = "xla"
  return kind


def dense_mask(q_pos, k_pos, q_seg, k_seg, k_valid=None):
  """Boolean [B, 1, T, S]: causal by position, within one packed segment, over filled cache slots."""
  mask = q_pos[:, :, None] >= k_pos[:, None, :]
  if q_seg is not None:
    mask &= q_seg[:, :, None] == k_seg[:, None, :]
  if k_valid is not None:
    mask &= k_valid[:, None, :]
  return mask[:, None]


def self_attention(q, k, v, positions, segment_ids, kind: str, mesh=None):
  """q [B, T, N, hd], k/v [B, T, KV, hd] (N a multiple of KV), positions [B, T], segment_ids [B, T] or None ->
  [B, T, N, hd], each query attending the earlier keys of its own segment."""
  kind = pick(kind, mesh, q.shape[1], q.dtype)
  if kind == "splash":
    return splash(q, k, v, segment_ids, mesh)
  if kind == "cudnn" and segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  mask = dense_mask(positions, positions, segment_ids, segment_ids)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn" if kind == "cudnn" else None)


def splash_block(seq_len: int) -> int:
  """Query/key block of the splash kernel: the largest of 512, 256, 128 dividing the sequence."""
  return next(b for b in (512, 256, 128) if seq_len % b == 0)


def _splash_kernel(n_heads: int, seq_len: int, interpret: bool):
  """Built inside each trace: the kernel holds the mask's block tables as arrays, which a cache would leak."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b = splash_block(seq_len)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(n_heads)])
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash(q, k, v, segment_ids, mesh=None):
  """Splash attention on [B, T, heads, hd] inputs (the kernel takes one row as [heads, T, hd], queries pre-scaled
  by hd^-0.5); each batch shard runs its own rows under shard_map, heads split over "tensor" where they divide."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  B, T, N, hd = q.shape
  interpret = dispatch.platform(mesh) == "cpu"
  if segment_ids is None:
    segment_ids = jnp.zeros((B, T), jnp.int32)

  def rows(q, k, v, seg):
    kernel = _splash_kernel(q.shape[2], T, interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))  # noqa: E731
    o = jax.vmap(one)(heads_first(q * (hd ** -0.5)), heads_first(k), heads_first(v), seg.astype(jnp.int32))
    return heads_first(o).astype(q.dtype)

  if mesh is None or math.prod(mesh.shape.values()) == 1:
    return rows(q, k, v, segment_ids)
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  batch = BATCH_AXES if B % shards == 0 else None
  tensor = mesh.shape.get("tensor", 1)
  heads = "tensor" if tensor > 1 and N % tensor == 0 and k.shape[2] % tensor == 0 else None
  spec = P(batch, None, heads, None)
  # check_vma off: the pallas_call declares its outputs without mesh axes (as megablox's, dispatch.py); every
  # input is split over the same axes as the output, so no cotangent needs a sum over the mesh.
  f = jax.shard_map(rows, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec, check_vma=False)
  return f(q, k, v, segment_ids)
