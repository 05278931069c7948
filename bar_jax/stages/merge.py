"""The merge stage: N branch artifacts -> one `moe` artifact (anchor + N domain experts, shared weights reconciled).

  python -m bar_jax.train --config=configs/merge.py --config.branches=runs/math,runs/code --config.base=runs/base \
      --workdir=runs/moe

Every branch is checked from its manifest and parameter metadata before any parameter is read: kind 'branch', one
base_fingerprint for all, one architecture, matching expert settings, no branch twice. Parameters are then streamed
leaf by leaf (artifact.open_params), each leaf verified against its fingerprint as it is read; any failure raises one
BarError naming the branch, and nothing is written. The merged model is written atomically with its lineage.
WORKDIR follows the workdir contract (bar_jax/io/workdir.py): the same config returns the merged model, another one
is refused.
"""
from __future__ import annotations

import os
from typing import Any

import jax

from bar_jax import sharding, stage_configs
from bar_jax.data.tokenizer import Tokenizer
from bar_jax.errors import BarError
from bar_jax.io import artifact
from bar_jax.io import workdir as workdir_lib
from bar_jax.model import transformer
from bar_jax.model.config import ModelConfig
from bar_jax.transforms import merge as merge_lib


def check_branches(dirs: list[str]) -> tuple[list[dict[str, Any]], list[ModelConfig]]:
  """Manifests and configs of the branches, or a BarError naming the first bad branch and what is wrong."""
  seen: dict[str, str] = {}
  for d in dirs:
    key = os.path.realpath(d)
    if key in seen:
      raise BarError(f"branch {d} is listed twice (also as {seen[key]}); list each branch once")
    seen[key] = d
  manifests, cfgs = [], []
  for d in dirs:
    m = artifact.read_manifest(d)
    if m.get("kind") != "branch":
      raise BarError(f"{d} is a {m.get('kind')!r} artifact, not a branch; pass directories written by the branch stage")
    try:
      cfg = ModelConfig.from_dict(m["model"])
    except (KeyError, TypeError, ValueError) as e:
      raise BarError(f"branch {d} has no valid model config in its manifest ({e}); re-run its branch stage") from None
    manifests.append(m)
    cfgs.append(cfg)
  first, base_fp = dirs[0], manifests[0].get("base_fingerprint")
  if not base_fp:
    raise BarError(f"branch {first} has no base_fingerprint in its manifest; re-run its branch stage")
  for d, m, cfg in zip(dirs, manifests, cfgs):
    if m.get("base_fingerprint") != base_fp:
      raise BarError(f"branch {d} was trained from base {str(m.get('base_fingerprint'))[:12]}, but {first} from "
                     f"{base_fp[:12]}: merge only branches of the same base")
    merge_lib.check_stackable(cfg, cfgs[0], what=f"branch {d}", into=first, fix="merge only branches of one base")
  return manifests, cfgs


def run(config, workdir: str) -> str:
  config, identity, state = stage_configs.begin(config, workdir)
  if state == workdir_lib.FINISHED:
    return workdir
  dirs = list(config.branches)
  if not dirs:
    raise BarError("no branches to merge: pass --config.branches=DIR1,DIR2,...")
  manifests, cfgs = check_branches(dirs)
  names = [m.get("domain") or os.path.basename(os.path.normpath(d)) for d, m in zip(dirs, manifests)]
  if len(set(names)) != len(names):
    raise BarError(f"two branches share a domain name ({names}): each expert needs its own; merge distinct domains")
  # Opening checks that the parameter files exist and hold the manifest's leaves; bytes are verified per leaf later.
  branch_params = []
  for d, m in zip(dirs, manifests):
    lazy = artifact.open_params(d, verify=True)
    if set(lazy) != set(m.get("leaf_fingerprints", {})):
      raise BarError(f"branch {d} fails verification: its parameter files and manifest list different leaves; "
                     "re-run its branch stage")
    branch_params.append(lazy)

  base_params, base_manifest = None, None
  if config.base:
    base_manifest = artifact.read_manifest(config.base)
    if base_manifest.get("fingerprint") != manifests[0]["base_fingerprint"]:
      raise BarError(f"config.base {config.base} has fingerprint {str(base_manifest.get('fingerprint'))[:12]}, not "
                     f"the branches' base {manifests[0]['base_fingerprint'][:12]}: pass the base they were made from")
    base_params = artifact.open_params(config.base, verify=True)
  weights = list(config.weights) or None
  params, cfg = merge_lib.merge(base_params, branch_params, cfgs, rule=config.rule, weights=weights,
                                ties_density=config.ties_density, ties_scale=config.ties_scale,
                                top_k=config.moe.top_k, norm_topk=config.moe.norm_topk)
  if config.place_on_mesh:
    mesh = sharding.make_mesh(config.mesh.to_dict())
    params = jax.device_put(params, transformer.param_shardings(cfg, mesh, params))

  parents = [dict(m, role="branch") for m in manifests]
  if base_manifest is not None:
    parents.append(dict(base_manifest, role="base"))
  record = {"stage": "merge", "steps": 0, "tokens": 0, "flops": 0,
            "config": {"rule": config.rule, "weights": weights, "ties_density": config.ties_density,
                       "branches": [m.get("fingerprint") for m in manifests]}}
  # Which data made each expert: the branches' capability records (spec, fingerprint, metric), by expert name.
  capabilities = {n: m["capability"] for n, m in zip(names, manifests) if m.get("capability")}
  manifest = {"kind": "moe", "model": cfg.to_dict(), "identity": identity, "experts": ["anchor"] + names,
              "capabilities": capabilities,
              "base_fingerprint": manifests[0]["base_fingerprint"], "merge_rule": config.rule,
              **artifact.lineage(parents, [record])}
  artifact.write(workdir, params, manifest, Tokenizer.load(dirs[0]))
  return workdir
