"""Sharding is data: logical axis names on every parameter, one table of rules mapping them to mesh axes; and the
placement of a training state (a partition's sliced leaves, the optimiser state, the checkpointed step).

Mesh axes are always ("data", "fsdp", "expert", "tensor"). The batch is split over (data, fsdp, expert) — the expert
axis shards tokens too (MaxText-style), so expert-parallel dispatch starts with each expert shard owning its tokens.
A rule whose mesh axis does not divide the dimension falls back to replication for that dimension, so the same code
runs on 1 CPU, 8 simulated devices, a GPU or a pod slice.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bar_jax.errors import BarError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis or axes (None = replicated). "embed" is FSDP over fsdp and also over expert where the
# leaf has no expert dimension (attention, embeddings, router): the expert axis carries the batch like fsdp does, so
# on an (fsdp=4, expert=2) mesh dense weights are split 8 ways, not 4 (MaxText maps embed the same way).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor", "embed": ("fsdp", "expert"), "heads": "tensor", "kv": "tensor", "mlp": "tensor",
    "exp": "expert", "exp_router": None, "layers": None, "norm": None, "lora": None,
}


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
  """Mesh over MESH_AXES. shape: {"data": 2, "expert": 4} or a 4-tuple; one entry may be -1 (takes the rest).

  Missing axes get size 1; with no shape everything goes on "data".
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if shape is None:
    sizes = {"data": -1}
  elif isinstance(shape, Mapping):
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
      raise BarError(f"unknown mesh axes {unknown}: use only {list(MESH_AXES)}")
    sizes = dict(shape)
  else:
    if len(shape) != len(MESH_AXES):
      raise BarError(f"mesh shape {tuple(shape)} needs {len(MESH_AXES)} entries for axes {MESH_AXES}")
    sizes = dict(zip(MESH_AXES, shape))
  dims = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if dims.count(-1) > 1:
    raise BarError(f"mesh shape {dict(zip(MESH_AXES, dims))} has more than one -1; give all but one axis a size")
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if known <= 0 or n % known:
      raise BarError(f"mesh {dict(zip(MESH_AXES, dims))} does not divide the {n} available devices; "
                     f"make the product of the sizes divide {n}")
    dims[dims.index(-1)] = n // known
  if math.prod(dims) != n:
    raise BarError(f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices but {n} are available; "
                   f"set config.mesh so the sizes multiply to {n} (one entry may be -1)")
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from(config) -> Mesh:
  """The mesh of a stage config's `mesh` section (stage_configs.Mesh: axis sizes, one may be -1)."""
  return make_mesh(config.mesh.to_dict())


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
  """PartitionSpec for one array from its logical axes; a mesh axis is used once and only where it divides.

  Leaves are read left to right, so in experts [L, E, D, F] "exp" claims the expert axis before "embed" does.
  """
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape):
    rule = RULES.get(name) if name else None
    picked: list[str] = []
    for mesh_axis in ((rule,) if isinstance(rule, str) else rule or ()):
      size = mesh.shape[mesh_axis] * math.prod(mesh.shape[a] for a in picked)
      if mesh_axis not in used and mesh.shape[mesh_axis] > 1 and dim % size == 0:
        picked.append(mesh_axis)
    used.update(picked)
    out.append(None if not picked else picked[0] if len(picked) == 1 else tuple(picked))
  return P(*out)


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
  """NamedSharding per leaf, from matching trees of logical axes and shapes (or arrays)."""
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
  return jax.tree.map(lambda ax, s: NamedSharding(mesh, spec_for(ax, np.shape(s) if not isinstance(s, tuple) else s,
                                                                 mesh)),
                      axes_tree, shapes_tree, is_leaf=is_axes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension split over every data-like mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, batch_axis: int = 0) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global arrays sharded over the batch axes (multi-process safe)."""
  out = {}
  for k, v in local.items():
    spec = [None] * v.ndim
    spec[batch_axis] = BATCH_AXES
    out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, P(*spec)), np.asarray(v))
  return out


def constrain_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Inside jit: x's leading (batch) dimension split over the batch axes, the rest replicated. A no-op without a
  mesh, on one device, or when the batch does not divide (e.g. a single decoded sequence)."""
  if mesh is None or mesh.size == 1 or x.shape[0] % batch_divisor(mesh):
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES, *([None] * (x.ndim - 1)))))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ----------------------------------------------------------------------------------------------------------------
# Training state: the partition's slices, the optimiser state, the checkpointed step.

def step_array(n: int, mesh: Mesh) -> jax.Array:
  """The checkpointed step as a replicated global array: orbax refuses a single-device array from several processes."""
  return jax.device_put(np.asarray(n, np.int32), replicated(mesh))


def opt_state_shardings(tx: optax.GradientTransformation, trainable: dict, mesh: Mesh) -> Any:
  """Each optimiser-state leaf shaped like a parameter (Adam's mu, nu) sharded like it; scalars replicated.

  jit(tx.init) alone does not propagate them: zeros_like ignores its input's layout, and the moments would land
  unsharded on one device, i.e. replicated (2 x the trainable bytes on every device).
  """
  return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, trainable),
                               {k: v.sharding for k, v in trainable.items()},
                               transform_non_params=lambda _: replicated(mesh),
                               is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def slice_sharding(full: NamedSharding, x) -> NamedSharding:
  """The leaf's sharding for a slice of it. A mesh axis that no longer divides its dimension (a 2-expert leaf cut to
  one expert on an expert axis of 2) moves onto another sharded dimension that it divides, so the slice stays split
  over as many devices as the full leaf was."""
  mesh = full.mesh
  spec = list(tuple(full.spec) + (None,) * (x.ndim - len(full.spec)))
  names = lambda a: () if a is None else a if isinstance(a, tuple) else (a,)
  freed = []
  for i, a in enumerate(spec):
    if a is not None and x.shape[i] % _axis_size(mesh, a):
      freed += names(a)
      spec[i] = None
  for name in freed:
    for i, a in enumerate(spec):
      if a is not None and x.shape[i] % (_axis_size(mesh, a) * mesh.shape[name]) == 0:
        spec[i] = names(a) + (name,)
        break
  return NamedSharding(mesh, P(*spec))


def _axis_size(mesh, a) -> int:
  names = a if isinstance(a, tuple) else (a,)
  return int(np.prod([mesh.shape[n] for n in names]))
