"""Sparse MoE dispatch: the `dropless` grouped-matmul path and the `expert_parallel` shard_map path.

Both compute exactly what `moe.dense_dispatch` computes (every token's top-k experts, combined by the router weights),
only without running the experts a token did not pick:

  dropless         the N*k token copies are sorted by expert and multiplied group by group (the grouped matmul,
                   below). Nothing is dropped. With a mesh, each batch shard sorts and multiplies its own tokens
                   (experts replicated).
  expert_parallel  `jax.shard_map` over the mesh: experts are split over the `expert` axis, the token batch over
                   (data, fsdp, expert). Each device buckets its token copies by expert into slots of `capacity`
                   rows, exchanges them with `all_to_all`, runs its local experts, and sends the results back.

Capacity (expert_parallel): each device holds n = N / (data*fsdp*expert) tokens, i.e. n*k copies. For each expert
it sends at most C = min(n, ceil(capacity_factor * n * k / E)) copies; capacity_factor 0 means C = n, which can hold
every copy (a token picks an expert at most once), so nothing drops. Copies beyond C are dropped in token order (a
later token loses first): they contribute nothing to the output, and `run` returns their global count.

The grouped matmul (`impl`), chosen per backend by "auto" (`auto_impl`) so that it never densifies:

  scanned   (CPU; GPU for now) groups padded to blocks of `block` rows, each block owned by one expert; a scan
            over the blocks reads each block's expert weights in place and skips the unused blocks, with its own
            backward pass. Compiled for an H100 (M = 8192 copies, D = 2048, F = 5632, G = 8) its largest array
            is 2 x M x F elements, its saved projections (experiments/results/aot_targets.md).
  blocked   the same blocks as one batched matmul over gathered weights: a [blocks, D, F] copy of the weights,
            1.2 x G x M x F elements there, so "auto" does not pick it.
  megablox  (TPU) jax's Pallas grouped matmul (`jax.experimental.pallas.ops.tpu.megablox`: gmm forward and d(x),
            tgmm for d(W)), on the CPU in interpret mode (tests only: slow).
  ragged    `jax.lax.ragged_dot`. Never picked by "auto": on GPU (jax 0.10.2) its forward and gradient expand
            densely over the G groups, on TPU its weight gradient is a dense masked matmul over all groups
            (docs/DESIGN.md; experiments/results/aot_targets.md measures both).
  mosaic_gpu  (Hopper) jax's Mosaic-GPU kernels (`ragged_dot_mgpu` forward and d(x), `transposed_ragged_dot_mgpu`
            for d(W)) under one VJP (`mosaic_gpu_grouped_matmul`). Not picked by "auto": no device has run it yet,
            so until a device check compares it with the dense reference the GPU runs "scanned".
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from bar_jax.errors import BarError

BATCH_AXES = ("data", "fsdp", "expert")
CPU_IMPL = "scanned"  # the grouped matmul `impl="auto"` picks on the CPU (experiments/bench_moe.py times both)
GPU_IMPL = "scanned"  # ... on GPU: the padded blocks until a Mosaic-GPU kernel with a VJP is verified on a device
TPU_IMPL = "megablox"
IMPLS = ("scanned", "blocked", "megablox", "ragged", "mosaic_gpu")
RAGGED_IMPLS = ("ragged", "megablox", "mosaic_gpu")   # grouped matmuls over ragged groups (no padding to blocks)


def platform(mesh=None) -> str:
  """The platform the program is compiled for: the mesh's devices' (an ahead-of-time compile for a TPU or GPU
  topology runs on a CPU host), else the default backend. "cpu" | "gpu" | "tpu"."""
  if mesh is not None:
    name = mesh.devices.flat[0].platform
    return "gpu" if name in ("cuda", "rocm", "gpu") else name
  return jax.default_backend()


def auto_impl(mesh=None) -> str:
  """The grouped matmul `impl="auto"` picks for the mesh's platform (module docstring)."""
  return {"cpu": CPU_IMPL, "tpu": TPU_IMPL}.get(platform(mesh), GPU_IMPL)


def run(kind: str, x, weights, idx, gate, up, down, capacity_factor: float = 0.0, mesh=None, *, impl: str = "auto"):
  """x [N, D], weights [N, E] (zero off the top-k), idx [N, k] -> (y [N, D], dropped token copies, int32 scalar).

  impl: "auto" (`auto_impl`) or one of IMPLS, the grouped matmul. expert_parallel's exchange is ragged
  (`ragged_all_to_all`) for RAGGED_IMPLS and padded to the capacity otherwise.
  """
  if impl == "auto":
    impl = auto_impl(mesh)
  if impl not in IMPLS:
    raise BarError(f"unknown grouped matmul {impl!r}: use 'auto' or one of {IMPLS}")
  interpret = platform(mesh) == "cpu"                        # megablox only
  if kind == "expert_parallel" and mesh is not None and mesh.shape.get("expert", 1) > 1:
    return expert_parallel(x, weights, idx, gate, up, down, mesh, capacity_factor, impl=impl, interpret=interpret)
  if kind in ("dropless", "expert_parallel"):
    return (dropless_sharded(x, weights, idx, gate, up, down, mesh, impl=impl, interpret=interpret),
            jnp.zeros((), jnp.int32))
  raise BarError(f"unknown dispatch {kind!r}: use 'dense', 'dropless' or 'expert_parallel'")


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by both paths.

def _swiglu_grouped(h, gate, up, down):
  """h [G, M, D] rows of group g through expert g: [G, M, D]."""
  dt = h.dtype
  a = jnp.einsum("gmd,gdf->gmf", h, gate.astype(dt))
  b = jnp.einsum("gmd,gdf->gmf", h, up.astype(dt))
  return jnp.einsum("gmf,gfd->gmd", jax.nn.silu(a) * b, down.astype(dt))


def _combine(y_copies, weights, idx):
  """y_copies [N*k, D] in (token, slot) order -> sum over slots weighted by the router: [N, D]."""
  N, k = idx.shape
  w = jnp.take_along_axis(weights, idx, axis=1).astype(y_copies.dtype)
  return jnp.einsum("nkd,nk->nd", y_copies.reshape(N, k, -1), w)


def _rank_in_group(flat_e, n_groups: int):
  """Position of each element among the earlier elements with the same group id (stable, token-major)."""
  onehot = jax.nn.one_hot(flat_e, n_groups, dtype=jnp.int32)
  return jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, flat_e[:, None], axis=1)[:, 0]


def default_block(n_copies: int, n_experts: int, impl: str = "blocked") -> int:
  """Rows per block of the CPU grouped matmul.

  blocked: each block gathers its expert's weights (3*D*F floats), which costs about as much as multiplying ~100
  rows by them, so blocks have at least 128 rows; beyond that, small enough that padding (about half a block per
  expert) stays a small share of the n_copies rows.
  scanned: no gather, but each block is one step of a scan; in a sweep of 128, 256 and 512 rows at SmolLM2 widths
  (one layer, 4096 tokens, E=5, top_k 1 and 2, 2-core CPU) 256-512 ran fastest, padding included. Never more rows
  than the copies need.
  """
  target = max(n_copies // (4 * n_experts), 128 if impl == "blocked" else 256)
  block = min(1 << int(math.log2(target)), 512)
  return block if impl == "blocked" else min(block, 1 << max(0, n_copies - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------------
# Dropless: sort token copies by expert, grouped matmul.

def dropless(x, weights, idx, gate, up, down, *, impl: str = "blocked", block: int | None = None,
             interpret: bool | None = None):
  N, k = idx.shape
  E = gate.shape[0]
  flat_e = idx.reshape(-1)                                   # copy c = token c // k, slot c % k
  order = jnp.argsort(flat_e, stable=True)                   # copies sorted by expert
  sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
  xs = x[order // k]                                         # [N*k, D] sorted copies
  if impl in RAGGED_IMPLS:
    ys = _ragged_swiglu(xs, sizes, gate, up, down, impl, interpret)
  else:
    ys = _padded_grouped_ffn(xs, flat_e[order], sizes, gate, up, down, block or default_block(N * k, E, impl), impl)
  y_copies = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)   # back to (token, slot) order
  return _combine(y_copies, weights, idx)


def dropless_sharded(x, weights, idx, gate, up, down, mesh, *, impl: str = "blocked", interpret: bool | None = None):
  """`dropless` on each batch shard's own tokens (shard_map over data, fsdp, expert; experts replicated), so the
  sort never crosses devices. Without a mesh, or with tokens that do not split evenly, it is plain `dropless`."""
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES) if mesh is not None else 1
  if shards == 1 or x.shape[0] % shards:
    return dropless(x, weights, idx, gate, up, down, impl=impl, interpret=interpret)
  tok, rep = P(BATCH_AXES), P()
  check_vma = impl != "megablox"

  def shard(x, weights, idx, *experts):
    # The experts meet each shard's own tokens: cast them to varying here, so the scanned path's custom backward
    # returns per-shard weight gradients and this cast's transpose sums them over the shards. Megablox's
    # pallas_call declares its outputs without mesh axes (jax 0.10.2's kernel has no vma argument), which
    # check_vma=True refuses; unchecked, shard_map transposes each replicated input by summing its cotangent over
    # the mesh axes, the same sum the cast gives (tests/test_grouped_matmul.py checks both gradients on 8 devices).
    if check_vma:
      experts = [jax.lax.pcast(w, BATCH_AXES, to="varying") for w in experts]
    return dropless(x, weights, idx, *experts, impl=impl, interpret=interpret)
  f = jax.shard_map(shard, mesh=mesh, in_specs=(tok, tok, tok, rep, rep, rep), out_specs=tok, check_vma=check_vma)
  return f(x, weights, idx, gate, up, down)


def grouped_matmul(x, w, sizes, impl: str = "megablox", *, interpret: bool | None = None):
  """x [M, K] with rows sorted by group, w [G, K, N], sizes [G] int32 (sum <= M) -> [M, N] in x's dtype; rows past
  sum(sizes) are zero. impl "megablox" (interpret mode when the default backend is the CPU, unless told),
  "ragged" (`lax.ragged_dot`) or "mosaic_gpu" (Hopper only; compiled, not yet run: `mosaic_gpu_grouped_matmul`)."""
  if impl == "ragged":
    return jax.lax.ragged_dot(x, w, sizes)
  if impl == "mosaic_gpu":
    return mosaic_gpu_grouped_matmul(x, w.astype(x.dtype), sizes.astype(jnp.int32))
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  M, K = x.shape
  tiling = megablox_tiling(M, K, w.shape[-1])
  # Rows in no group are never written by the kernel, forward (y) or backward (dx): uninitialised on a TPU, NaN in
  # interpret mode. Selecting zero for them on both sides of the kernel keeps them, and their cotangents, zero.
  grouped = (jnp.arange(M) < jnp.sum(sizes))[:, None]
  pad = -M % tiling[0]                                       # gmm wants whole row tiles; padded rows are in no group
  xp = jnp.pad(jnp.where(grouped, x, 0), ((0, pad), (0, 0)))
  # Positional: gmm is a custom_vjp with nondiff_argnums (preferred_element_type, tiling, transpose_rhs, interpret).
  y = megablox.gmm(xp, w.astype(x.dtype), sizes.astype(jnp.int32), x.dtype, tiling, None, None, False, interpret)[:M]
  return jnp.where(grouped, y, 0).astype(x.dtype)


# Hopper's Mosaic-GPU grouped matmuls from jax (`ragged_dot_mgpu` forward and d(x), `transposed_ragged_dot_mgpu`
# for d(W)) under one VJP; no device has run it, so "auto" does not pick it until a device check compares it with
# the dense reference. Its forward compiles for an H100 from a CPU host (tests/test_grouped_matmul.py); the d(W)
# kernel reads the live device's SM count (`jax.devices()[0].core_count`) while tracing, so its gradient compiles
# only on a GPU host.
# Tiles: 128 x 128 output blocks, 64-deep contraction (the kernels' own sweep ranges); K, and for d(W) also the
# weight's two dims, must be multiples of them.
_MGPU_TILES = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


@jax.custom_vjp
def mosaic_gpu_grouped_matmul(x, w, sizes):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=sizes, **_MGPU_TILES)


def _mgpu_fwd(x, w, sizes):
  return mosaic_gpu_grouped_matmul(x, w, sizes), (x, w, sizes)


def _mgpu_bwd(res, dy):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
  x, w, sizes = res
  dy = dy.astype(x.dtype)
  dx = ragged_dot_mgpu.ragged_dot(dy, w, group_sizes=sizes, transpose_rhs=True, **_MGPU_TILES)
  dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(x, dy, group_sizes=sizes, **_MGPU_TILES)
  return dx, dw.astype(w.dtype), None


mosaic_gpu_grouped_matmul.defvjp(_mgpu_fwd, _mgpu_bwd)


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  """Megablox's (rows, contraction, columns) tile: 512 rows (fewer when there are fewer, in whole 128s), up to
  1024 along K and N (MaxText's defaults are of this size; a partial last tile is masked by the kernel)."""
  return min(512, -(-m // 128) * 128), min(k, 1024), min(n, 1024)


def _ragged_swiglu(xs, sizes, gate, up, down, impl: str, interpret: bool | None = None):
  """xs [M, D] sorted by expert, sizes [E] -> the SwiGLU of each row through its expert, by a ragged grouped
  matmul (`grouped_matmul`); rows past sum(sizes) come out zero."""
  dt = xs.dtype
  mm = functools.partial(grouped_matmul, sizes=sizes, impl=impl, interpret=interpret)
  a = mm(xs, gate.astype(dt))
  b = mm(xs, up.astype(dt))
  return mm(jax.nn.silu(a) * b, down.astype(dt))


def _padded_grouped_ffn(xs, sorted_e, sizes, gate, up, down, block: int, impl: str):
  """xs [M, D] sorted by expert (sorted_e [M], sizes [E]) -> ys [M, D]. Each expert's rows start on a fresh block
  of `block` rows. "blocked": every block is multiplied by a gathered copy of its expert's weights in one batched
  einsum; "scanned": a scan over the blocks reads each block's expert weights in place and skips the blocks past
  the last used one (`lax.cond`), forward and backward."""
  M, D = xs.shape
  n_blocks, row, block_expert, used = _block_layout(sorted_e, sizes, M, gate.shape[0], block)
  xb = jnp.zeros((n_blocks * block, D), xs.dtype).at[row].set(xs, unique_indices=True).reshape(n_blocks, block, D)
  if impl == "scanned":
    yb = _scan_swiglu(xb, block_expert, used, gate, up, down)
  else:
    yb = _swiglu_grouped(xb, gate[block_expert], up[block_expert], down[block_expert])
  return yb.reshape(n_blocks * block, D)[row]


def _block_layout(sorted_e, sizes, n_rows: int, n_experts: int, block: int):
  """Where each sorted copy goes when every expert's rows start on a fresh block of `block` rows: (n_blocks, the
  padded row of each copy, each block's expert, whether a block holds any row)."""
  # Static bound on the blocks needed: sum_e ceil(n_e / B) <= (M + E (B - 1)) / B, and n_e <= M / k <= M.
  n_blocks = min((n_rows + n_experts * (block - 1)) // block, n_experts * -(-n_rows // block))
  blocks_per_expert = -(-sizes // block)
  block_end = jnp.cumsum(blocks_per_expert)
  group_start = jnp.cumsum(sizes) - sizes
  row = (block_end - blocks_per_expert)[sorted_e] * block + jnp.arange(n_rows) - group_start[sorted_e]
  block_expert = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(n_blocks), side="right"), n_experts - 1)
  return n_blocks, row, block_expert, jnp.arange(n_blocks) < block_end[-1]


@jax.custom_vjp
def _scan_swiglu(xb, block_expert, used, gate, up, down):
  return _scan_swiglu_fwd(xb, block_expert, used, gate, up, down)[0]


def _scan_swiglu_fwd(xb, block_expert, used, gate, up, down):
  dt = xb.dtype
  F = gate.shape[-1]

  def step(_, blk):
    x, e, u = blk

    def run(x):
      a, b = x @ gate[e].astype(dt), x @ up[e].astype(dt)
      return (jax.nn.silu(a) * b) @ down[e].astype(dt), a, b

    def zeros(x):  # from x, so that under shard_map they vary over the same mesh axes as run's outputs
      hidden = jnp.broadcast_to(jnp.zeros_like(x[..., :1]), x.shape[:-1] + (F,))
      return jnp.zeros_like(x), hidden, hidden
    return None, jax.lax.cond(u, run, zeros, x)

  _, (y, a, b) = jax.lax.scan(step, None, (xb, block_expert, used))
  return y, (xb, block_expert, used, a, b, gate, up, down)


def _scan_swiglu_bwd(res, dy):
  """Per used block: dx and the block's expert's weight gradients, added in place into one [E, ...] buffer each."""
  xb, block_expert, used, a_all, b_all, gate, up, down = res
  dt = xb.dtype

  def step(grads, blk):
    x, e, u, a, b, g = blk

    def run(grads):
      dgate, dup, ddown = grads
      sig = jax.nn.sigmoid(a)
      silu = a * sig
      dh = g @ down[e].astype(dt).T
      da = dh * b * (sig * (1 + a * (1 - sig)))
      db = dh * silu
      ddown = ddown.at[e].add((silu * b).T @ g)
      dgate = dgate.at[e].add(x.T @ da)
      dup = dup.at[e].add(x.T @ db)
      return (dgate, dup, ddown), da @ gate[e].astype(dt).T + db @ up[e].astype(dt).T
    return jax.lax.cond(u, run, lambda grads: (grads, jnp.zeros_like(x)), grads)

  zeros = tuple(jnp.zeros_like(w) for w in (gate, up, down))
  (dgate, dup, ddown), dx = jax.lax.scan(step, zeros, (xb, block_expert, used, a_all, b_all, dy))
  return dx, None, None, dgate, dup, ddown


_scan_swiglu.defvjp(_scan_swiglu_fwd, _scan_swiglu_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Expert parallel: shard_map over the expert axis, tokens exchanged by all_to_all.

def capacity(tokens_per_shard: int, k: int, n_experts: int, capacity_factor: float) -> int:
  """Copies each device may send to one expert (see the module docstring); capacity_factor <= 0: no drops."""
  if capacity_factor <= 0:
    return tokens_per_shard
  return max(1, min(tokens_per_shard, math.ceil(capacity_factor * tokens_per_shard * k / n_experts)))


def expert_parallel(x, weights, idx, gate, up, down, mesh, capacity_factor: float, *, impl: str = "blocked",
                    interpret: bool | None = None):
  N, D = x.shape
  k = idx.shape[1]
  E = gate.shape[0]
  X = mesh.shape["expert"]
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if E % X:
    raise BarError(f"{E} experts do not split over the expert mesh axis of size {X}: pick an expert axis dividing {E}")
  if N % shards:
    raise BarError(f"{N} tokens do not split over the {shards} batch shards (data*fsdp*expert): "
                   f"make batch*seq a multiple of {shards}")
  n = N // shards
  C = capacity(n, k, E, capacity_factor)
  body = (functools.partial(_ragged_body, impl=impl, interpret=interpret) if impl in RAGGED_IMPLS
          else _padded_body)
  tok, exp = P(BATCH_AXES), P("expert")

  def shard(x, weights, idx, gate, up, down):
    y, dropped = body(x, idx, gate, up, down, X=X, E=E, C=C)
    return _combine(y, weights, idx), jax.lax.psum(dropped, BATCH_AXES)

  # check_vma off for megablox, as in dropless_sharded; the experts are split over "expert" here, so their
  # cotangents are summed over the batch axes only, by either rule.
  f = jax.shard_map(shard, mesh=mesh, in_specs=(tok, tok, tok, exp, exp, exp), out_specs=(tok, P()),
                    check_vma=impl != "megablox")
  return f(x, weights, idx, gate, up, down)


def _padded_body(x, idx, gate, up, down, *, X: int, E: int, C: int):
  """One device: x [n, D], idx [n, k], local experts [E/X, ...] -> (y_copies [n*k, D], dropped copies)."""
  n, D = x.shape
  k = idx.shape[1]
  El = E // X
  flat_e = idx.reshape(-1)
  rank = _rank_in_group(flat_e, E)
  keep = rank < C
  slot = jnp.where(keep, flat_e * C + rank, E * C)           # dropped copies point at a zero row
  token = jnp.full((E * C + 1,), n, jnp.int32).at[slot].set(jnp.arange(n * k, dtype=jnp.int32) // k)[:E * C]
  x_ext = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])
  send = x_ext[token].reshape(X, El, C, D)                   # bucket j goes to expert shard j
  recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # [X sources, El, C, D]
  h = recv.transpose(1, 0, 2, 3).reshape(El, X * C, D)
  y = _swiglu_grouped(h, gate, up, down).reshape(El, X, C, D).transpose(1, 0, 2, 3)
  back = jax.lax.all_to_all(y, "expert", 0, 0, tiled=True).reshape(E * C, D)  # global expert order
  y_copies = jnp.concatenate([back, jnp.zeros((1, D), back.dtype)])[slot]
  return y_copies, jnp.sum(~keep).astype(jnp.int32)


def _ragged_body(x, idx, gate, up, down, *, X: int, E: int, C: int, impl: str = "ragged",
                 interpret: bool | None = None):
  """GPU/TPU variant of `_padded_body`: only the kept copies travel (`ragged_all_to_all`), local experts run as a
  ragged grouped matmul (`impl`: ragged_dot or megablox). XLA:CPU does not implement ragged_all_to_all, so this
  path only lowers on the CPU; its offsets and sizes (`ragged_dispatch_params` and the functions after it) are
  tested against numpy."""
  n, D = x.shape
  k = idx.shape[1]
  El = E // X
  me = jax.lax.axis_index("expert")
  flat_e = idx.reshape(-1)
  keep = _rank_in_group(flat_e, E) < C
  key = jnp.where(keep, flat_e, E)                           # dropped copies sort last and are never sent
  order = jnp.argsort(key, stable=True)
  sorted_e = key[order]
  xs = x[order // k]
  per_expert = jnp.bincount(key, length=E + 1)[:E].astype(jnp.int32)
  all_sizes = jax.lax.all_gather(per_expert, "expert")       # [X, E]: every shard's copies per expert
  rows = ragged_recv_rows(n * k, X, El, C)
  recv = jax.lax.ragged_all_to_all(xs, jnp.zeros((rows, D), x.dtype), *ragged_dispatch_params(all_sizes, me),
                                   axis_name="expert")
  recv_e = received_local_expert(all_sizes, me, rows)
  local_order = jnp.argsort(recv_e, stable=True)             # received rows grouped by local expert
  sizes = jnp.bincount(recv_e, length=El + 1)[:El].astype(jnp.int32)
  dt = x.dtype
  yr = _ragged_swiglu(recv[local_order], sizes, gate, up, down, impl, interpret)
  y_recv = jnp.zeros_like(yr).at[local_order].set(yr)
  back = jax.lax.ragged_all_to_all(y_recv, jnp.zeros((n * k, D), dt), *ragged_return_params(all_sizes, me),
                                   axis_name="expert")
  ys = jnp.where((sorted_e < E)[:, None], back, 0)
  y_copies = jnp.zeros_like(ys).at[order].set(ys)
  return y_copies, jnp.sum(~keep).astype(jnp.int32)


# The ragged exchange's arithmetic, as pure functions of every shard's group sizes and this shard's index (X shards
# along the expert axis, E experts, El = E / X per shard, shard d holding experts d*El .. d*El + El - 1). Each
# source sends its copies sorted by expert, so the rows for shard d are one contiguous run; each receiver lays out
# what it gets in source order, and within a source by local expert.

def _exclusive_cumsum(x, axis: int = 0):
  return jnp.cumsum(x, axis=axis) - x


def shard_counts(all_sizes):
  """all_sizes [X, E] (all_sizes[s, e]: copies shard s sends to expert e) -> [X src, X dst] copies per shard pair."""
  X, E = all_sizes.shape
  return jnp.asarray(all_sizes).reshape(X, X, E // X).sum(-1)


def _exchange_params(counts, shard):
  """counts [X src, X dst] -> this shard's (input_offsets, send_sizes, output_offsets, recv_sizes), each [X]."""
  send_sizes = counts[shard]
  return _exclusive_cumsum(send_sizes), send_sizes, _exclusive_cumsum(counts, axis=0)[shard], counts[:, shard]


def ragged_dispatch_params(all_sizes, shard):
  """The `ragged_all_to_all` arguments that send this shard's sorted copies to their experts' shards.

  all_sizes [X, E] int32; shard: this shard's index along the expert axis (an int or a traced scalar).
  Returns four [X] int32 arrays: input_offsets[d] and send_sizes[d], the run of this shard's sorted rows bound for
  shard d; output_offsets[d], where that run starts in shard d's buffer (after the runs of sources 0..me-1);
  recv_sizes[s], the rows this shard receives from shard s.
  """
  return _exchange_params(shard_counts(all_sizes), shard)


def ragged_return_params(all_sizes, shard):
  """The arguments that send each received row's result back to its source, into the row its input left from:
  the dispatch exchange with sources and destinations swapped (the counts transposed). Four [X] int32 arrays."""
  return _exchange_params(shard_counts(all_sizes).T, shard)


def received_local_expert(all_sizes, shard, n_rows: int):
  """[n_rows] int32: the local expert (0 .. El-1) of each row of this shard's receive buffer, El past the rows
  received. Rows arrive as segments in (source, local expert) order."""
  X, E = all_sizes.shape
  El = E // X
  mine = jnp.asarray(all_sizes).reshape(X, X, El)[:, shard]  # [src, El]
  ends = jnp.cumsum(mine.reshape(-1))
  seg = jnp.searchsorted(ends, jnp.arange(n_rows), side="right")
  return jnp.where(seg < X * El, seg % El, El).astype(jnp.int32)


def ragged_recv_rows(n_copies: int, X: int, El: int, C: int) -> int:
  """Static rows of the receive buffer: each of the X sources sends at most all its n_copies, and at most C to each
  of this shard's El experts."""
  return X * min(n_copies, El * C)
