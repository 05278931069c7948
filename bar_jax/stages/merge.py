"""The merge stage: N branch artifacts -> one `moe` artifact (anchor + N domain experts, shared weights reconciled).

  python -m bar_jax.train --config=configs/merge.py --config.branches=runs/math,runs/code --workdir=runs/moe

Every branch is checked from its manifest and parameter metadata before any parameter is read: kind 'branch', one
base_fingerprint for all, one architecture, matching expert settings, no branch twice. Parameters are then streamed
leaf by leaf (artifact.open_params), each leaf verified against its fingerprint as it is read; any failure raises one
BarError naming the branch, and nothing is written. The merged model is written atomically with its lineage.
"""
from __future__ import annotations

import os
from typing import Any

import jax

from bar_jax import sharding
from bar_jax.data.tokenizer import Tokenizer
from bar_jax.errors import BarError
from bar_jax.io import artifact
from bar_jax.model.config import ModelConfig
from bar_jax.transforms import merge as merge_lib


def _split(value) -> list[str]:
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return [str(v) for v in (value or [])]


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
  arch0 = merge_lib.architecture(cfgs[0])
  for d, m, cfg in zip(dirs, manifests, cfgs):
    if m.get("base_fingerprint") != base_fp:
      raise BarError(f"branch {d} was trained from base {str(m.get('base_fingerprint'))[:12]}, but {first} from "
                     f"{base_fp[:12]}: merge only branches of the same base")
    arch = merge_lib.architecture(cfg)
    if arch != arch0:
      diff = ", ".join(f"{k}={arch.get(k)} vs {arch0.get(k)}" for k in sorted(arch) if arch.get(k) != arch0.get(k))
      raise BarError(f"branch {d} has a different architecture from {first} ({diff}): merge only branches of one base")
    for field in ("ffn", "n_experts", "expert_kind") + (("lora_rank", "lora_alpha") if cfg.expert_kind == "lora"
                                                         else ()):
      if getattr(cfg, field) != getattr(cfgs[0], field):
        raise BarError(f"branch {d} has {field}={getattr(cfg, field)} but {first} has {getattr(cfgs[0], field)}: "
                       "re-train it with the same expert settings")
  return manifests, cfgs


def run(config, workdir: str) -> str:
  dirs = _split(config.branches)
  if not dirs:
    raise BarError("no branches to merge: pass --config.branches=DIR1,DIR2,...")
  if os.path.exists(os.path.join(workdir, artifact.MANIFEST)):
    raise BarError(f"{workdir} already holds an artifact; choose a new --workdir or delete it first")
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
  if config.get("base", ""):
    base_manifest = artifact.read_manifest(config.base)
    if base_manifest.get("fingerprint") != manifests[0]["base_fingerprint"]:
      raise BarError(f"config.base {config.base} has fingerprint {str(base_manifest.get('fingerprint'))[:12]}, not "
                     f"the branches' base {manifests[0]['base_fingerprint'][:12]}: pass the base they were made from")
    base_params = artifact.open_params(config.base, verify=True)
  weights = [float(w) for w in _split(config.get("weights", ""))] or None
  model = config.get("compute", None)
  model = model.to_dict() if hasattr(model, "to_dict") else dict(model or {})

  params, cfg = merge_lib.merge(base_params, branch_params, cfgs, rule=config.rule, weights=weights,
                                ties_density=config.get("ties_density", 0.2), ties_scale=config.get("ties_scale", 1.0),
                                top_k=model.get("top_k", 0), norm_topk=model.get("norm_topk", False),
                                dispatch=model.get("dispatch", "dense"))
  if config.get("place_on_mesh", False):
    mesh = sharding.make_mesh(config.mesh.to_dict() if hasattr(config.mesh, "to_dict") else config.mesh)
    params = jax.device_put(params, sharding.param_shardings(cfg, mesh, params))

  parents = [dict(m, role="branch") for m in manifests]
  if base_manifest is not None:
    parents.append(dict(base_manifest, role="base"))
  record = {"stage": "merge", "steps": 0, "tokens": 0, "flops": 0,
            "config": {"rule": config.rule, "weights": weights, "ties_density": config.get("ties_density", 0.2),
                       "branches": [m.get("fingerprint") for m in manifests]}}
  # Which data made each expert: the branches' capability records (spec, fingerprint, metric), by expert name.
  capabilities = {n: m["capability"] for n, m in zip(names, manifests) if m.get("capability")}
  manifest = {"kind": "moe", "model": cfg.to_dict(), "experts": ["anchor"] + names, "capabilities": capabilities,
              "base_fingerprint": manifests[0]["base_fingerprint"], "merge_rule": config.rule,
              **artifact.lineage(parents, [record])}
  artifact.write(workdir, params, manifest, Tokenizer.load(dirs[0]))
  return workdir
