"""Stage upgrade (BAR stage 5): put a newer branch's expert into an MoE, or add a new one, then retrain only the router.

  mode=replace   expert i (config.expert; -1 = the expert named like the branch's domain) <- the branch's domain
                 expert, router column i <- the branch's router column.
  mode=add       the branch's domain expert becomes expert E, the router gains column E from the branch's column.
  router_update  full  (the paper): every router column trains on the stratified sample of all domains;
                 local (beyond the paper): only column i / E trains, on the new domain's data plus a small replay
                       sample (local.replay_fraction) of the other domains;
                 none: no training (the swap alone).

Checks, all before anything is written: the branch is a branch artifact of the MoE's base (base_fingerprint), of the
same architecture and expert settings; replace: the index is in 1..E-1 and the expert there has the branch's domain
(unless allow_domain_change); add: no expert of that domain exists yet. Afterwards the stage checks that every
expert not replaced or added, the attention, embeddings and norms are bit-identical to the input; the manifest
records both parents (the moe and the branch), what was swapped, per-expert fingerprints, and the router's record.
The router training is stages/router_training.py's (as the router stage's); WORKDIR follows the workdir contract
(bar_jax/io/workdir.py), checked before anything else.
"""
from __future__ import annotations

from bar_jax.errors import BarError
from bar_jax.io import artifact
from bar_jax.model.config import ModelConfig
from bar_jax.io import workdir as workdir_lib
from bar_jax.stages import common
from bar_jax.stages import router_training as rt
from bar_jax.transforms import upgrade as upgrade_lib

MODES = ("replace", "add")
UPDATES = ("full", "local", "none")


def check(config, moe_manifest: dict, branch_manifest: dict, moe_cfg, branch_cfg) -> int:
  """The expert slot the branch goes into, or a BarError naming the problem."""
  if config.mode not in MODES:
    raise BarError(f"mode={config.mode!r}: use 'replace' (swap expert i) or 'add' (append a new expert)")
  if config.router_update not in UPDATES:
    raise BarError(f"router_update={config.router_update!r}: use one of {list(UPDATES)}")
  if branch_manifest.get("kind") != "branch":
    raise BarError(f"{config.branch} is a {branch_manifest.get('kind')!r} artifact, not a branch: pass a directory "
                   "written by the branch stage")
  base_fp = moe_manifest.get("base_fingerprint")
  if branch_manifest.get("base_fingerprint") != base_fp:
    raise BarError(f"branch {config.branch} was trained from base {str(branch_manifest.get('base_fingerprint'))[:12]}"
                   f", but the MoE from {str(base_fp)[:12]}: upgrade only with a branch of the MoE's base")
  upgrade_lib.check_compatible(moe_cfg, branch_cfg, what=f"branch {config.branch}")
  experts = list(moe_manifest.get("experts") or [])
  domain = branch_manifest.get("domain")
  if config.mode == "add":
    if domain in experts:
      raise BarError(f"the MoE already has a {domain!r} expert (index {experts.index(domain)}): use "
                     "--config.mode=replace to upgrade it")
    return moe_cfg.n_experts
  index = int(config.expert)
  if index == -1:
    if domain not in experts[1:]:
      raise BarError(f"the MoE has no {domain!r} expert (experts: {experts}): pass --config.expert=INDEX with "
                     "--config.allow_domain_change=True, or --config.mode=add")
    index = experts.index(domain, 1)
  if not 1 <= index < moe_cfg.n_experts:
    raise BarError(f"expert index {index} is out of range: this MoE has experts 1..{moe_cfg.n_experts - 1} "
                   f"({experts[1:]}; 0 is the frozen anchor); pass one of those")
  if experts[index] != domain and not config.allow_domain_change:
    raise BarError(f"expert {index} is {experts[index]!r} but branch {config.branch} is {domain!r}: pass "
                   "--config.allow_domain_change=True to replace it with another domain")
  return index


def run(config, workdir: str) -> str:
  identity = workdir_lib.identity(config)
  if workdir_lib.resolve(workdir, identity) == workdir_lib.FINISHED:
    return workdir
  if not config.branch:
    raise BarError("config.branch is empty: pass --config.branch=DIR, the branch artifact to upgrade with")
  moe_manifest = artifact.read_manifest(config.model) if config.model else {}
  if not config.model or moe_manifest.get("kind") != "moe":
    rt.load_moe(config.model)  # the one-line error for a missing or wrong artifact
  branch_manifest = artifact.read_manifest(config.branch)
  moe_cfg, branch_cfg = (ModelConfig.from_dict(m["model"]) for m in (moe_manifest, branch_manifest))
  index = check(config, moe_manifest, branch_manifest, moe_cfg, branch_cfg)
  # The experts' capabilities, found through the manifests' records before any parameter is read: a missing one
  # stops here (full router update) or is left out of the replay sample and the diagnostics (local, none).
  domain = branch_manifest["domain"]
  kept = [e for i, e in enumerate(moe_manifest.get("experts", [])) if i > 0 and not (config.mode == "replace" and
                                                                                     i == index)]
  capabilities = {k: v for k, v in (moe_manifest.get("capabilities") or {}).items() if k in kept}
  if branch_manifest.get("capability"):
    capabilities[domain] = branch_manifest["capability"]
  lookup = dict(moe_manifest, capabilities=capabilities)
  _, missing = rt.load_capabilities(lookup, kept + [domain], skip_missing=config.router_update != "full")
  if domain in missing and config.router_update != "none":
    rt.load_capabilities(lookup, [domain])  # the new expert's data is needed: its one-line error

  model = rt.load_moe(config.model)
  branch = common.load_model(config.branch)
  experts = list(model.manifest.get("experts"))
  domain = branch.manifest["domain"]
  if config.mode == "replace":
    params, cfg = upgrade_lib.replace(model.params, model.cfg, branch.params, branch.cfg, index), model.cfg
    replaced = experts[index]
    experts[index] = domain
  else:
    params, cfg = upgrade_lib.add(model.params, model.cfg, branch.params, branch.cfg)
    replaced = None
    experts.append(domain)
  cfg, compute = common.model_overrides(cfg, config.compute)
  mesh = common.mesh_from(config)
  workdir_lib.start(workdir, identity)
  metrics_before = rt.evaluate(config, cfg, params, model.tokenizer, mesh, [e for e in experts[1:] if e not in missing],
                               compute) \
      if config.eval.before else {}

  swap = {"stage": "upgrade", "steps": 0, "tokens": 0, "flops": 0, "mode": config.mode, "expert": index,
          "domain": domain, "replaced": replaced, "branch": branch.manifest.get("fingerprint")}
  stages = [swap]
  rc = config.router
  if config.router_update != "none":
    if config.router_update == "full":
      fractions = {d: float(rc.fraction) for d in rt.data_domains(rc, dict(lookup, experts=experts))}
      frozen = []
    else:  # local: the new domain's data plus a replay sample of the others; only column `index` trains
      found = [e for e in experts if e not in missing]
      others = [d for d in rt.data_domains(rc, dict(lookup, experts=found)) if d != domain]
      fractions = {domain: float(config.local.fraction), **{d: float(config.local.replay_fraction) for d in others}}
      frozen = [e for e in range(cfg.n_experts) if e != index]
    params, record = rt.train_router(model, cfg, params, rc, fractions, workdir, mesh, seed=config.seed,
                                     identity=identity, name=f"router_{config.router_update}",
                                     frozen_experts=frozen, compute=compute)
    record["router_update"] = config.router_update
    stages.append(record)
  # Bit-identity guard: against the input MoE, only the new expert (slot `index`) and the router may differ.
  rt.check_only_router_changed(model.params, params, cfg, allowed_experts=[index])
  parents = [dict(model.manifest, role="moe"), dict(branch.manifest, role="branch")]
  return rt.finish(config, workdir, model, cfg, params, stages, parents, experts, mesh, identity=identity,
                   metrics_before=metrics_before, compute=compute,
                   upgrade={k: swap[k] for k in ("mode", "expert", "domain", "replaced", "branch")},
                   router_update=config.router_update, merge_rule=model.manifest.get("merge_rule"),
                   capabilities=capabilities, capabilities_missing=missing)
