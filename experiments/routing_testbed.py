"""Which router carries each capability's tokens to its own expert: BAR on the reasoning-gym testbed, router arms
side by side, with retention, routing diagnostics and top-k.

  python experiments/routing_testbed.py --n=8                 # 8 capabilities, LoRA experts (configs/bar_testbed.py)
  python experiments/routing_testbed.py --n=8 --arms=ridge --top_ks=2

Steps (each a stage run through the workdir contract, so a killed run resumes and a changed setting redoes only
what it changes): the pipeline of configs/bar_testbed.py:n=N with its router step off (base, N branches, merged,
the base's and the merged model's evaluations), then one router-stage run per arm on the merged model:

  recipe        the merge's branch-trained columns, then router training (the paper's recipe)
  embed         domain-embedding columns (router.init=embed), no training steps
  ridge         the closed-form ridge router (router.init=ridge), no training steps
  ridge_train   the ridge router, then router training (warm start)
  pair          the merge's columns plus a closed-form term that keeps each domain on {anchor, its own expert}
                (router.init=pair): each domain routed as its branch routed it, no training steps
  pair_train    the pair router, then router training
Every arm is evaluated on all N capabilities, each branch on its own; `--top_ks` evaluates the arms in
`--topk_arms` again with only the k largest router weights kept (not renormalised: the paper's setting).

Measures per capability: base, branch and arm scores (greedy match, n items, 95% interval), retention
(arm - base) / (branch - base) with a paired bootstrap interval, the own expert's mean router weight and rank on
held-out tokens (the shared system prompt masked out; evals/routing.token_diagnostics) and the router's entropy;
the top-k change against all experts, paired. Writes experiments/results/routing_testbed_n<N>_<expert>.md / .json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bar_jax.errors import run_main  # light: no jax import before the device flags are set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {
    "recipe": {},
    "embed": {"init": "embed", "epochs": 0.0},
    "ridge": {"init": "ridge", "epochs": 0.0},
    "ridge_train": {"init": "ridge"},
    "pair": {"init": "pair", "epochs": 0.0},
    # softmax regression onto the branches' splits; the penalty 1e-3 (not the ridge's 1e-2): at 1e-2 the fit
    # leaked 0.07 of a domain's weight to the other experts on 8 synthetic domains, at 1e-3 0.017
    "split": {"init": "split", "epochs": 0.0, "init_ridge": 1e-3},
    "pair_train": {"init": "pair"},
}


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=8, help="testbed capabilities (configs/bar_testbed.py:n=N)")
  ap.add_argument("--expert", default="lora", choices=("lora", "ffn"))
  ap.add_argument("--arms", default="recipe,embed,ridge,ridge_train", help="router arms compared at E = n")
  ap.add_argument("--default", default="ridge", help="the arm run at every E of --es (pre-registered)")
  ap.add_argument("--es", default="", help="comma list of expert counts for the retention curve, e.g. 2,4,8,16")
  ap.add_argument("--remove", default="", help="a capability to withdraw from the default arm's MoE at E = n "
                  "(upgrade mode=remove, router_update=none); the others tested unchanged by TOST at +-5 points")
  ap.add_argument("--oracle", action="store_true", help="each capability on [anchor, its own expert] with the "
                  "merged shared weights and its branch's router (upgrade mode=oracle)")
  ap.add_argument("--eval_merged", action="store_true", help="also score the merged model before any router")
  ap.add_argument("--top_ks", default="2", help="comma list of k < E to evaluate for --topk_arms ('' = none)")
  ap.add_argument("--topk_arms", default="ridge,recipe")
  ap.add_argument("--norm_topk", action="store_true", help="renormalise the k kept weights (label <arm>_top<k>n)")
  ap.add_argument("--taus", default="1,3,10,30", help="sharpening factors of the diagnostics (merged, recipe)")
  ap.add_argument("--diag_rows", type=int, default=8, help="held-out rows of --diag_seq tokens per capability")
  ap.add_argument("--diag_replies", action="store_true", help="also the own expert's weight over the assistant's "
                  "reply tokens only (the tokens generated when scored)")
  ap.add_argument("--diag_seq", type=int, default=256)
  ap.add_argument("--sft_steps", type=int, default=0, help="branch SFT steps (0 = configs/bar_testbed.py's)")
  ap.add_argument("--router_steps", type=int, default=0, help="router training steps cap (0 = the config's)")
  ap.add_argument("--branch_router_init", default="", help="the branches' router_init ('' = configs/branch.py's; "
                  "expert_share: the expert starts with --branch_share of the weight)")
  ap.add_argument("--branch_share", type=float, default=0.0, help="router_expert_share of expert_share (0 = the "
                  "config's)")
  ap.add_argument("--config_arg", default="", help="extra configs/bar_testbed.py args, e.g. tiny")
  ap.add_argument("--workdir", default="")
  ap.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"))
  a = ap.parse_args(argv)
  a.arms = [x for x in a.arms.split(",") if x]
  unknown = [x for x in a.arms if x not in ARMS]
  if unknown:
    ap.error(f"unknown arms {unknown}: choose from {list(ARMS)}")
  a.es = [int(e) for e in a.es.split(",") if e]
  if a.default not in ARMS:
    ap.error(f"unknown --default {a.default!r}: choose from {list(ARMS)}")
  if a.default not in a.arms:
    a.arms.append(a.default)
  a.top_ks = [int(k) for k in a.top_ks.split(",") if k]
  a.topk_arms = [x for x in a.topk_arms.split(",") if x in a.arms]
  a.taus = [float(t) for t in a.taus.split(",") if t]
  a.name = f"routing_testbed_n{a.n}_{a.expert}" + (f"_{a.config_arg}" if a.config_arg else "")
  if a.branch_router_init:
    a.name += f"_{a.branch_router_init}" + (f"{a.branch_share:g}" if a.branch_share else "")
  a.workdir = a.workdir or os.path.join("runs", a.name)
  given = list(argv if argv is not None else sys.argv[1:])
  a.command = "python " + " ".join(["experiments/routing_testbed.py"] + given)
  return a


def _eval_step(pipeline, config, spec, domains, outdir, top_k=0, norm_topk=False):
  ec = pipeline.eval_config(config, spec)
  ec.domains = ",".join(domains)
  if top_k:
    ec.moe.top_k = top_k
    ec.moe.norm_topk = norm_topk
  return pipeline.Step(os.path.basename(outdir), "eval", outdir, ec, result_file="eval.json")


def _run(step, timings):
  if step.done():
    return step.outdir
  t0 = time.time()
  step.run()
  timings[step.outdir] = round(time.time() - t0, 1)
  return step.outdir


def _items(edir, domain):
  with open(os.path.join(edir, "eval.json")) as f:
    (row,) = json.load(f)["models"]
  res = row["domains"][domain]
  return {it["id"]: float(it["ok"]) for it in res["items"]}, res, row


def _diagnostics(label, mdir, domains, taus, a, wd, routing, artifact, replies=False):
  """token_diagnostics of one model, cached in WD/diag_<label>.json under its fingerprint and settings; replies:
  over the assistant's reply tokens only (the tokens the model generates when scored)."""
  m = artifact.read(mdir)
  key = {"fingerprint": m.manifest["fingerprint"], "taus": taus, "rows": a.diag_rows, "seq": a.diag_seq}
  if replies:
    key["replies"] = True
  path = os.path.join(wd, f"diag_{label}{'_replies' if replies else ''}.json")
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("key") == key:
      return cached["report"]
  t1 = time.time()
  rows = routing.domain_rows(m.tokenizer, list(domains), seq_len=a.diag_seq, max_rows=a.diag_rows, mask_system=True,
                             replies_only=replies)
  experts = ["general" if i == 0 else e for i, e in enumerate(m.manifest["experts"])]
  report = routing.token_diagnostics(m.params, m.cfg, rows, experts, taus=taus)
  report["seconds"] = round(time.time() - t1, 1)
  with open(path + ".tmp", "w") as f:
    json.dump({"key": key, "report": report}, f)
  os.replace(path + ".tmp", path)
  return report


def main(argv=None):
  a = parse(argv)
  import numpy as np
  from bar_jax.data import capability
  from bar_jax.evals import routing, stats
  from bar_jax.io import artifact
  from bar_jax.stages import pipeline

  n_max = max([a.n] + a.es)
  arg = ",".join([f"n={n_max}", f"expert={a.expert}"] + ([a.config_arg] if a.config_arg else []))
  config = pipeline.stage_config("bar_testbed", arg)
  if a.sft_steps:
    config.branch.phases.sft.steps = a.sft_steps
  if a.router_steps:
    config.router.overrides.router.max_steps = a.router_steps
  if a.branch_router_init:
    config.branch.overrides.router_init = a.branch_router_init
  if a.branch_share:
    config.branch.overrides.router_expert_share = a.branch_share
  wd = a.workdir
  os.makedirs(wd, exist_ok=True)
  pipeline.compilation_cache(config, wd)
  timings: dict[str, float] = {}
  # The pipeline's base and branch steps only: the merges, routers and evaluations below are this experiment's.
  for step in pipeline.plan(config, wd):
    if step.kind in ("base", "branch"):
      _run(step, timings)
  names = [capability.get(d).name for d in config.domains]
  spec_of = dict(zip(names, config.domains))
  branch_dirs = {n: os.path.join(wd, f"branch_{n}") for n in names}
  base_eval = _run(_eval_step(pipeline, config, os.path.join(wd, "base"), config.domains,
                              os.path.join(wd, "eval", "base")), timings)
  branch_evals = {n: _run(_eval_step(pipeline, config, branch_dirs[n], [spec_of[n]],
                                     os.path.join(wd, "eval", f"branch_{n}")), timings) for n in names}

  def merged_for(e):
    mc = pipeline.stage_config("merge", None, config.merge)
    mc.branches = ",".join(branch_dirs[n] for n in names[:e])
    mc.base = os.path.join(wd, "base")
    return _run(pipeline.Step(f"E{e}/merged", "merge", os.path.join(wd, f"E{e}", "merged"), mc), timings)

  def router_for(e, arm, merged):
    rc = pipeline.router_config(config, merged)
    rc.router.update(ARMS[arm])
    return _run(pipeline.Step(f"E{e}/router_{arm}", "router", os.path.join(wd, f"E{e}", f"router_{arm}"), rc),
                timings)

  def eval_for(e, label, mdir, top_k=0):
    return _run(_eval_step(pipeline, config, mdir, [spec_of[n] for n in names[:e]],
                           os.path.join(wd, f"E{e}", "eval", label), top_k=top_k, norm_topk=a.norm_topk), timings)

  # The arms side by side at E = n; the default arm alone at every other E.
  plans = {e: (a.arms if e == a.n else [a.default]) for e in sorted(set([a.n] + a.es))}
  evals, models, topk_evals, diags = {}, {}, {}, {}
  for e, arms in plans.items():
    merged = merged_for(e)
    models[(e, "merged")] = merged
    if e == a.n and a.eval_merged:
      evals[(e, "merged")] = eval_for(e, "merged", merged)
    for arm in arms:
      models[(e, arm)] = router_for(e, arm, merged)
      evals[(e, arm)] = eval_for(e, arm, models[(e, arm)])
      if e == a.n and arm in a.topk_arms:
        for k in a.top_ks:
          topk_evals[(arm, k)] = eval_for(e, f"{arm}_top{k}{'n' if a.norm_topk else ''}", models[(e, arm)], top_k=k)
    for (ee, label), mdir in models.items():
      if ee == e and (label, e) not in diags:
        taus = a.taus if label in ("merged", "recipe") and e == a.n else [1.0]
        diags[(label, e)] = _diagnostics(f"E{e}_{label}", mdir, [spec_of[n] for n in names[:e]], taus, a, wd,
                                         routing, artifact)
        if a.diag_replies:
          diags[(label, e, "replies")] = _diagnostics(f"E{e}_{label}", mdir, [spec_of[n] for n in names[:e]], [1.0],
                                                      a, wd, routing, artifact, replies=True)

  # Withdrawing a capability, and the oracle rows (upgrade stage modes), at E = n.
  def upgrade_step(label, **kw):
    uc = pipeline.stage_config("upgrade", None, {"router": config.router.overrides.get("router", {}).to_dict()})
    uc.update(kw)
    uc.eval.update(domains="", before=False)
    uc.routing.max_rows = 0
    return _run(pipeline.Step(label, "upgrade", os.path.join(wd, f"E{a.n}", label), uc), timings)

  removal = None
  if a.remove:
    if a.remove not in names[:a.n]:
      raise SystemExit(f"--remove={a.remove}: not one of the E = {a.n} capabilities {names[:a.n]}")
    gone = upgrade_step(f"remove_{a.remove}", model=models[(a.n, a.default)], mode="remove",
                        expert=names.index(a.remove) + 1, router_update="none")
    others = [n for n in names[:a.n] if n != a.remove]
    edir = _run(_eval_step(pipeline, config, gone, [spec_of[n] for n in others],
                           os.path.join(wd, f"E{a.n}", "eval", f"remove_{a.remove}")), timings)
    removal = (gone, edir, others)
  oracles = {}
  if a.oracle:
    for name in names[:a.n]:
      odir = upgrade_step(f"oracle_{name}", model=models[(a.n, "merged")], mode="oracle", expert=names.index(name) + 1,
                          branch=branch_dirs[name], router_update="none")
      oracles[name] = _run(_eval_step(pipeline, config, odir, [spec_of[name]],
                                      os.path.join(wd, f"E{a.n}", "eval", f"oracle_{name}")), timings)
      # the branch's own split of its tokens between the anchor and its expert: what a router should reproduce
      diags[(f"oracle_{name}", a.n)] = _diagnostics(f"E{a.n}_oracle_{name}", odir, [spec_of[name]], [1.0], a, wd,
                                                    routing, artifact)

  # Tables.
  base_items = {n: _items(base_eval, n)[0] for n in names}
  branch_items = {n: _items(branch_evals[n], n)[0] for n in names}
  result = {"command": a.command, "n": a.n, "es": sorted(plans), "expert": a.expert, "capabilities": names,
            "rows": {}, "timings": timings}
  lines = [f"# Router arms on the testbed: {a.expert} experts", "", f"Made by: `{a.command}`.", "",
           "Score = greedy match on held-out items (n per capability below); retention = (arm - base) / (branch - "
           "base) on the same items, paired bootstrap 95% interval (`undefined` where the branch's own gain has a "
           "95% interval touching 0); own = the capability's own expert's mean router weight on its held-out tokens "
           "(layer mean, shared system prompt masked), (rank among the E + 1 experts); then its share of the domain "
           "experts' weight, own / (1 - anchor); with --diag_replies, replies = the own expert's weight and rank "
           "over the assistant's reply tokens only (the tokens a scored model generates).", ""]

  def row_cells(e, label, edir, name):
    ids = sorted(base_items[name])
    b = np.array([base_items[name][i] for i in ids])
    s_ = np.array([branch_items[name][i] for i in ids])
    got = _items(edir, name)[0]
    m_ = np.array([got[i] for i in ids])
    r = stats.retention(b, s_, m_)
    rep = diags.get((label, e), {})
    own = rep.get("own", {}).get("1", {}).get(name)
    share = routing.own_share(rep, "1", name) if own else None
    result["rows"].setdefault(f"E{e}_{label}", {})[name] = {"score": float(m_.mean()), "retention": r, "own": own,
                                                             "own_share": share}
    ret = (f"{100 * r['retention']:.0f}% [{100 * r['ci'][0]:.0f}, {100 * r['ci'][1]:.0f}]" if r["defined"]
           else "undefined")
    rep_own = diags.get((label, e, "replies"), {}).get("own", {}).get("1", {}).get(name)
    if rep_own:
      result["rows"][f"E{e}_{label}"][name]["own_replies"] = rep_own
    return (f"{100 * m_.mean():.1f}, {ret}, " + (f"{own['weight']:.2f} ({own['rank']}); {share['share']:.2f}"
                                                 if own else "-")
            + (f"; replies {rep_own['weight']:.2f} ({rep_own['rank']})" if rep_own else ""))

  arm_labels = [lab for (e, lab) in evals if e == a.n]
  lines += [f"## E = {a.n}: the arms", "", f"Uniform router weight = {1 / (a.n + 1):.3f}.", "",
            "| capability | n | base | branch | " + " | ".join(
                f"{lab}: score, retention [95%], own (rank); share" for lab in arm_labels) + " |",
            "|---" * (4 + len(arm_labels)) + "|"]
  for name in names[:a.n]:
    b = list(base_items[name].values())
    s_ = list(branch_items[name].values())
    cells = [name, str(len(b)), f"{100 * np.mean(b):.1f}", f"{100 * np.mean(s_):.1f}"]
    cells += [row_cells(a.n, lab, evals[(a.n, lab)], name) for lab in arm_labels]
    lines.append("| " + " | ".join(cells) + " |")
  if topk_evals:
    lines += ["", f"Top-k at E = {a.n} (the k largest router weights kept, "
              f"{'renormalised' if a.norm_topk else 'not renormalised'}) against all experts, "
              "paired (points):", "", "| arm | k | " + " | ".join(names[:a.n]) + " |",
              "|---" * (2 + a.n) + "|"]
    for (arm, k), edir in topk_evals.items():
      cells = [arm, str(k)]
      for name in names[:a.n]:
        full = _items(evals[(a.n, arm)], name)[0]
        got = _items(edir, name)[0]
        ids = sorted(full)
        pb = stats.paired_bootstrap([full[i] for i in ids], [got[i] for i in ids])
        result.setdefault("top_k", {}).setdefault(f"{arm}_top{k}", {})[name] = pb
        cells.append(f"{100 * pb['change']:+.1f} [{100 * pb['ci'][0]:+.1f}, {100 * pb['ci'][1]:+.1f}]")
      lines.append("| " + " | ".join(cells) + " |")
  if oracles:
    lines += ["", f"Oracle: each capability on [anchor, its own expert] with the merged shared weights and its "
              f"branch's two router columns, against the branch and the {a.default} arm (paired, points):", "",
              f"| capability | oracle | branch -> oracle [95%] | oracle -> {a.default} [95%] | own expert's weight "
              "in the oracle (the branch's split) |", "|---|---|---|---|---|"]
    for name in names[:a.n]:
      o = _items(oracles[name], name)[0]
      arm = _items(evals[(a.n, a.default)], name)[0]
      ids = sorted(o)
      br = [branch_items[name][i] for i in ids]
      oo = [o[i] for i in ids]
      p1 = stats.paired_bootstrap(br, oo)
      p2 = stats.paired_bootstrap(oo, [arm[i] for i in ids])
      result.setdefault("oracle", {})[name] = {"score": float(np.mean(oo)), "branch_to_oracle": p1,
                                               "oracle_to_arm": p2}
      lines.append(f"| {name} | {100 * np.mean(oo):.1f} | {100 * p1['change']:+.1f} [{100 * p1['ci'][0]:+.1f}, "
                   f"{100 * p1['ci'][1]:+.1f}] | {100 * p2['change']:+.1f} [{100 * p2['ci'][0]:+.1f}, "
                   f"{100 * p2['ci'][1]:+.1f}] | {diags[(f'oracle_{name}', a.n)]['own']['1'][name]['weight']:.2f} |")
  if removal:
    gone, edir, others = removal
    lines += ["", f"Withdrawing {a.remove} from the {a.default} arm's MoE (its expert and router column dropped, "
              "no router retraining): every other capability against the MoE before, paired; equivalent = TOST "
              "at +-5 points (the 90% interval inside it):", "", "| capability | before | after | change, 90% CI | "
              "equivalent |", "|---|---|---|---|---|"]
    for name in others:
      before = _items(evals[(a.n, a.default)], name)[0]
      after = _items(edir, name)[0]
      ids = sorted(before)
      t = stats.tost_paired([before[i] for i in ids], [after[i] for i in ids], 0.05)
      result.setdefault("remove", {})[name] = t
      lines.append(f"| {name} | {100 * np.mean(list(before.values())):.1f} | {100 * np.mean(list(after.values())):.1f}"
                   f" | {100 * t['change']:+.1f} [{100 * t['ci90'][0]:+.1f}, {100 * t['ci90'][1]:+.1f}] | "
                   f"{'yes' if t['equivalent'] else 'no'} (p = {t['p']:.3g}) |")
  if len(plans) > 1:
    lines += ["", f"## Retention against the number of experts ({a.default})", "",
              "| E | capability | score | retention [95%], own (rank) | router entropy (nats; log(E+1) = uniform) |",
              "|---|---|---|---|---|"]
    for e in plans:
      d = diags[(a.default, e)]
      for name in names[:e]:
        cell = row_cells(e, a.default, evals[(e, a.default)], name)
        score, rest = cell.split(", ", 1)
        lines.append(f"| {e} | {name} | {score} | {rest} | {d['entropy']['1'][name]:.3f} |")
  lines += ["", "## Routing diagnostics (held-out tokens; tau = every router kernel x tau, the model run with it)", ""]
  for (label, e, *tokens), rep in diags.items():
    lines += [f"**E = {e}, {label}{', reply tokens' if tokens else ''}** ({rep.get('seconds', '?')} s)", "",
              routing.format_diagnostics(rep)]
  lines += ["CPU seconds of the steps this invocation ran (a step found finished counts 0): " +
            ", ".join(f"{os.path.relpath(k, wd) if k.startswith(wd) else k}: {v}" for k, v in timings.items()), ""]
  result["diagnostics"] = {f"E{e}_{lab}{'_replies' if tokens else ''}": {kk: v[kk] for kk in ("own", "entropy",
                                                                                               "tokens")}
                           for (lab, e, *tokens), v in diags.items()}
  os.makedirs(a.results, exist_ok=True)
  with open(os.path.join(a.results, a.name + ".md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(a.results, a.name + ".json"), "w") as f:
    json.dump(result, f, indent=1, default=float)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  run_main(main)
