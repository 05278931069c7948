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

  mode=remove    expert i (config.expert: an index or an expert's name) and its router column are dropped (a
                 capability withdrawn: FlexOlmo's data opt-out); no branch. router_update none: the column goes and
                 the softmax renormalises over the rest; full: every remaining column retrains (local is refused:
                 no column is new). The guard maps old slots to new ones: every remaining expert (and, with none,
                 its router column) and every shared leaf bit-identical. Parents [moe]; `upgrade.slots` holds the
                 old index of each new slot.
  mode=oracle    the evaluation oracle of expert d (config.expert; -1 = the branch's domain): [anchor, expert d] of
                 the MoE with its merged shared weights and branch d's own two router columns (router_update must be
                 none). Branch d -> oracle is the cost of averaging the shared weights, oracle -> routed MoE the cost
                 of routing. The MoE's expert d must be the branch's domain expert bit for bit. A 2-expert `moe`
                 artifact (experts [anchor, d]) that the evaluate stage scores like any other; parents [moe, branch].
"""
from __future__ import annotations

import numpy as np

from bar_jax import pytree, sharding, stage_configs
from bar_jax.errors import BarError
from bar_jax.io import artifact
from bar_jax.io import models
from bar_jax.io import workdir as workdir_lib
from bar_jax.model.config import ModelConfig
from bar_jax.stages import common
from bar_jax.stages import router_training as rt
from bar_jax.transforms import upgrade as upgrade_lib

MODES = ("replace", "add", "remove", "oracle")
UPDATES = ("full", "local", "none")


def check_modes(config) -> None:
  if config.mode not in MODES:
    raise BarError(f"mode={config.mode!r}: use 'replace' (swap expert i), 'add' (append a new expert), 'remove' "
                   "(drop expert i) or 'oracle' ([anchor, expert d] with branch d's router columns)")
  if config.router_update not in UPDATES:
    raise BarError(f"router_update={config.router_update!r}: use one of {list(UPDATES)}")


def _as_index(spec):
  """config.expert as given (an int, a numeric string or a name) -> an int where it is one, else the stripped name."""
  text = str(spec).strip()
  return int(text) if text.lstrip("-").isdigit() else text


def expert_index(spec, experts: list, n_experts: int) -> int:
  """config.expert (an index 1..E-1, or an expert's name as the manifest's `experts` lists it) -> its slot."""
  spec = _as_index(spec)
  if isinstance(spec, str):
    if spec not in experts[1:]:
      raise BarError(f"the MoE has no expert named {spec!r} (experts: {experts}): pass --config.expert=NAME or INDEX")
    return experts.index(spec, 1)
  if not 1 <= spec < n_experts:
    raise BarError(f"expert index {spec} is out of range: this MoE has experts 1..{n_experts - 1} "
                   f"({experts[1:]}; 0 is the frozen anchor); pass one of those")
  return spec


def check(config, moe_manifest: dict, branch_manifest: dict, moe_cfg, branch_cfg) -> int:
  """The expert slot the branch goes into (replace, add) or stands for (oracle), or a BarError naming the problem."""
  check_modes(config)
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
  if _as_index(config.expert) == -1:
    if domain not in experts[1:]:
      raise BarError(f"the MoE has no {domain!r} expert (experts: {experts}): pass --config.expert=INDEX with "
                     "--config.allow_domain_change=True, or --config.mode=add")
    index = experts.index(domain, 1)
  else:
    index = expert_index(config.expert, experts, moe_cfg.n_experts)
  if config.mode == "oracle" and experts[index] != domain:
    raise BarError(f"expert {index} is {experts[index]!r} but branch {config.branch} is {domain!r}: the oracle of an "
                   "expert takes the branch it came from; pass that branch")
  if experts[index] != domain and not config.allow_domain_change:
    raise BarError(f"expert {index} is {experts[index]!r} but branch {config.branch} is {domain!r}: pass "
                   "--config.allow_domain_change=True to replace it with another domain")
  return index


def run(config, workdir: str) -> str:
  # config.expert is canonical in the typed config: 2 and "2" are one run, a name stays a name.
  config, ident, state = stage_configs.begin(config, workdir)
  if state == workdir_lib.FINISHED:
    return workdir
  check_modes(config)
  if config.mode == "remove":
    return _remove(config, workdir, ident)
  if not config.branch:
    raise BarError("config.branch is empty: pass --config.branch=DIR, the branch artifact to upgrade with")
  moe_manifest = artifact.read_manifest(config.model) if config.model else {}
  if not config.model or moe_manifest.get("kind") != "moe":
    rt.load_moe(config.model)  # the one-line error for a missing or wrong artifact
  branch_manifest = artifact.read_manifest(config.branch)
  moe_cfg, branch_cfg = (ModelConfig.from_dict(m["model"]) for m in (moe_manifest, branch_manifest))
  index = check(config, moe_manifest, branch_manifest, moe_cfg, branch_cfg)
  if config.mode == "oracle":
    return _oracle(config, workdir, ident, index)
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
  branch = models.load_model(config.branch)
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
  cfg, compute = common.model_overrides(cfg, config.compute, config.moe)
  mesh = sharding.mesh_from(config)
  workdir_lib.start(workdir, ident)
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
                                     identity=ident, name=f"router_{config.router_update}",
                                     frozen_experts=frozen, compute=compute, experts=experts,
                                     checkpoint_fallback=config.checkpoint_fallback)
    record["router_update"] = config.router_update
    stages.append(record)
  # Bit-identity guard: against the input MoE, only the new expert (slot `index`) and the router may differ.
  rt.check_only_router_changed(model.params, params, cfg, allowed_experts=[index])
  parents = [dict(model.manifest, role="moe"), dict(branch.manifest, role="branch")]
  return rt.finish(config, workdir, model, cfg, params, stages, parents, experts, mesh, identity=ident,
                   metrics_before=metrics_before, compute=compute,
                   upgrade={k: swap[k] for k in ("mode", "expert", "domain", "replaced", "branch")},
                   router_update=config.router_update, merge_rule=model.manifest.get("merge_rule"),
                   capabilities=capabilities, capabilities_missing=missing)


def check_kept(before, after, cfg_before, cfg_after, slots, *, router_changed: bool) -> None:
  """Guard before writing a model sliced from `before` (new slot s = old expert slots[s]): every shared leaf and
  every kept expert's slices bit-identical to the input's; its router columns too unless router_changed."""
  fb, fa = artifact.leaf_fingerprints(before), artifact.leaf_fingerprints(after)
  for path in sorted(set(fb) | set(fa)):
    if not path.startswith(upgrade_lib.MOE) and fb.get(path) != fa.get(path):
      raise RuntimeError(f"bug: shared leaf {path} changed; nothing was written")
  kept = {f"[{e}]" for e in slots}
  old = {k: v for k, v in upgrade_lib.expert_fingerprints(before, cfg_before).items() if k[k.rindex("["):] in kept}
  new = upgrade_lib.expert_fingerprints(after, cfg_after, slots=slots)
  bad = upgrade_lib.changed_experts(old, new, include_router=not router_changed)
  if bad:
    raise RuntimeError(f"bug: experts {bad} (old numbering) changed on the way out; nothing was written")


def _remove(config, workdir: str, ident: dict) -> str:
  """mode=remove: expert config.expert and its router column go; the router retrains (full) or not (none)."""
  if config.branch:
    raise BarError(f"mode=remove takes no branch (config.branch={config.branch}): leave --config.branch empty")
  if config.router_update == "local":
    raise BarError("router_update=local trains a new expert's column and mode=remove adds none: use none (the column "
                   "goes, the softmax renormalises over the rest) or full (every remaining column retrains)")
  moe_manifest = artifact.read_manifest(config.model) if config.model else {}
  if not config.model or moe_manifest.get("kind") != "moe":
    rt.load_moe(config.model)  # the one-line error for a missing or wrong artifact
  moe_cfg = ModelConfig.from_dict(moe_manifest["model"])
  experts = list(moe_manifest.get("experts") or [])
  if _as_index(config.expert) == -1:
    raise BarError(f"mode=remove needs the expert to drop: pass --config.expert=NAME or INDEX (experts: {experts})")
  index = expert_index(config.expert, experts, moe_cfg.n_experts)
  upgrade_lib.check_removable(moe_cfg, index)
  removed = experts[index]
  keep = [e for e in range(moe_cfg.n_experts) if e != index]
  experts = [experts[e] for e in keep]
  capabilities = {k: v for k, v in (moe_manifest.get("capabilities") or {}).items() if k in experts[1:]}
  lookup = dict(moe_manifest, capabilities=capabilities, experts=experts)
  _, missing = rt.load_capabilities(lookup, experts[1:], skip_missing=config.router_update != "full")

  model = rt.load_moe(config.model)
  params, cfg = upgrade_lib.remove(model.params, model.cfg, index)
  cfg, compute = common.model_overrides(cfg, config.compute, config.moe)
  mesh = sharding.mesh_from(config)
  workdir_lib.start(workdir, ident)
  found = [e for e in experts[1:] if e not in missing]
  metrics_before = rt.evaluate(config, cfg, params, model.tokenizer, mesh, found, compute) if config.eval.before else {}
  swap = {"stage": "upgrade", "steps": 0, "tokens": 0, "flops": 0, "mode": "remove", "expert": index,
          "domain": removed, "removed": removed, "slots": keep}
  stages = [swap]
  if config.router_update == "full":
    rc = config.router
    fractions = {d: float(rc.fraction) for d in rt.data_domains(rc, lookup)}
    params, record = rt.train_router(model, cfg, params, rc, fractions, workdir, mesh, seed=config.seed,
                                     identity=ident, name="router_full", compute=compute, experts=experts,
                                     checkpoint_fallback=config.checkpoint_fallback)
    record["router_update"] = "full"
    stages.append(record)
  check_kept(model.params, params, model.cfg, cfg, keep, router_changed=config.router_update != "none")
  return rt.finish(config, workdir, model, cfg, params, stages, [dict(model.manifest, role="moe")], experts, mesh,
                   identity=ident, metrics_before=metrics_before, compute=compute,
                   upgrade={k: swap[k] for k in ("mode", "expert", "domain", "removed", "slots")},
                   router_update=config.router_update, merge_rule=model.manifest.get("merge_rule"),
                   capabilities=capabilities, capabilities_missing=missing)


def _oracle(config, workdir: str, ident: dict, index: int) -> str:
  """mode=oracle: [anchor, expert `index`] of the MoE, its merged shared weights, the branch's two router columns."""
  if config.router_update != "none":
    raise BarError(f"mode=oracle keeps the branch's own router columns, so router_update={config.router_update!r} "
                   "has nothing to do: pass --config.router_update=none")
  model = rt.load_moe(config.model)
  branch = models.load_model(config.branch)
  domain = branch.manifest["domain"]
  m, b = pytree.as_flat(model.params), pytree.as_flat(branch.params)
  # Expert `index` must be this branch's domain expert (merge copies it bit for bit); an MoE upgraded since, or
  # merged from another branch of the domain, would pair the branch's router columns with another expert.
  for path in m:
    if path.startswith(upgrade_lib.LORA):
      mine, theirs = np.asarray(m[path])[:, index - 1], np.asarray(b[path])[:, 0]
    elif path.startswith(upgrade_lib.EXPERTS) and model.cfg.expert_kind == "ffn":
      mine, theirs = np.asarray(m[path])[:, index], np.asarray(b[path])[:, 1]
    else:
      continue
    if not np.array_equal(mine, theirs):
      raise BarError(f"expert {index} ({domain}) of {config.model} is not the domain expert of branch "
                     f"{config.branch} ({path} differs): the MoE was merged from or upgraded to another {domain} "
                     "branch; pass that branch")
  capabilities = {k: v for k, v in (model.manifest.get("capabilities") or {}).items() if k == domain}
  if branch.manifest.get("capability"):
    capabilities[domain] = branch.manifest["capability"]
  experts = [model.manifest.get("experts", ["anchor"])[0], domain]
  _, missing = rt.load_capabilities(dict(model.manifest, capabilities=capabilities), [domain], skip_missing=True)
  params, cfg = upgrade_lib.slice_experts(model.params, model.cfg, [0, index], router=branch.params)
  cfg, compute = common.model_overrides(cfg, config.compute, config.moe)
  mesh = sharding.mesh_from(config)
  check_kept(model.params, params, model.cfg, cfg, [0, index], router_changed=True)
  if not np.array_equal(pytree.as_flat(params)[upgrade_lib.ROUTER], b[upgrade_lib.ROUTER]):
    raise RuntimeError("bug: the oracle's router is not the branch's; nothing was written")
  workdir_lib.start(workdir, ident)
  record = {"mode": "oracle", "expert": index, "domain": domain, "moe": model.manifest.get("fingerprint"),
            "branch": branch.manifest.get("fingerprint")}
  stages = [dict(stage="upgrade", steps=0, tokens=0, flops=0, **record)]
  parents = [dict(model.manifest, role="moe"), dict(branch.manifest, role="branch")]
  return rt.finish(config, workdir, model, cfg, params, stages, parents, experts, mesh, identity=ident,
                   metrics_before={}, compute=compute, upgrade=record, router_update="none",
                   merge_rule=model.manifest.get("merge_rule"), capabilities=capabilities,
                   capabilities_missing=missing)
