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
}


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=8, help="testbed capabilities (configs/bar_testbed.py:n=N)")
  ap.add_argument("--expert", default="lora", choices=("lora", "ffn"))
  ap.add_argument("--arms", default="recipe,embed,ridge,ridge_train")
  ap.add_argument("--top_ks", default="2", help="comma list of k < E to evaluate for --topk_arms ('' = none)")
  ap.add_argument("--topk_arms", default="ridge,recipe")
  ap.add_argument("--taus", default="1,3,10,30", help="sharpening factors of the diagnostics (merged, recipe)")
  ap.add_argument("--diag_rows", type=int, default=8, help="held-out rows of --diag_seq tokens per capability")
  ap.add_argument("--diag_seq", type=int, default=256)
  ap.add_argument("--config_arg", default="", help="extra configs/bar_testbed.py args, e.g. tiny")
  ap.add_argument("--workdir", default="")
  ap.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"))
  a = ap.parse_args(argv)
  a.arms = [x for x in a.arms.split(",") if x]
  unknown = [x for x in a.arms if x not in ARMS]
  if unknown:
    ap.error(f"unknown arms {unknown}: choose from {list(ARMS)}")
  a.top_ks = [int(k) for k in a.top_ks.split(",") if k]
  a.topk_arms = [x for x in a.topk_arms.split(",") if x in a.arms]
  a.taus = [float(t) for t in a.taus.split(",") if t]
  a.name = f"routing_testbed_n{a.n}_{a.expert}" + (f"_{a.config_arg}" if a.config_arg else "")
  a.workdir = a.workdir or os.path.join("runs", a.name)
  given = list(argv if argv is not None else sys.argv[1:])
  a.command = "python " + " ".join(["experiments/routing_testbed.py"] + given)
  return a


def _eval_step(pipeline, config, spec, domains, outdir, top_k=0):
  ec = pipeline.eval_config(config, spec)
  ec.domains = ",".join(domains)
  if top_k:
    ec.compute.top_k = top_k
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


def main(argv=None):
  a = parse(argv)
  import numpy as np
  from bar_jax.data import capability
  from bar_jax.evals import routing, stats
  from bar_jax.io import artifact
  from bar_jax.stages import pipeline

  arg = ",".join([f"n={a.n}", f"expert={a.expert}"] + ([a.config_arg] if a.config_arg else []))
  config = pipeline.stage_config("bar_testbed", arg)
  config.router.enabled = False  # the arms below are the router rows
  config.eval_branches = False   # each branch is scored on its own capability only (below)
  wd = a.workdir
  timings: dict[str, float] = {}
  t0 = time.time()
  pipeline.run(config, wd)
  timings["pipeline"] = round(time.time() - t0, 1)
  names = [capability.get(d).name for d in config.domains]
  merged = os.path.join(wd, "merged")
  base_eval = os.path.join(wd, "eval", "base")
  merged_eval = os.path.join(wd, "eval", "bar")

  branch_evals = {}
  for d, name in zip(config.domains, names):
    bdir = os.path.join(wd, f"branch_{name}")
    branch_evals[name] = _run(_eval_step(pipeline, config, bdir, [d], os.path.join(wd, "eval", f"branch_{name}")),
                              timings)

  arm_dirs, arm_evals, topk_evals = {}, {}, {}
  for arm in a.arms:
    rc = pipeline.router_config(config, merged)
    rc.router.update(ARMS[arm])
    out = os.path.join(wd, f"router_{arm}")
    arm_dirs[arm] = _run(pipeline.Step(f"router_{arm}", "router", out, rc), timings)
    arm_evals[arm] = _run(_eval_step(pipeline, config, out, config.domains, os.path.join(wd, "eval", arm)), timings)
    if arm in a.topk_arms:
      for k in a.top_ks:
        topk_evals[(arm, k)] = _run(_eval_step(pipeline, config, out, config.domains,
                                               os.path.join(wd, "eval", f"{arm}_top{k}"), top_k=k), timings)

  # Routing diagnostics on held-out tokens, cached per model fingerprint and settings.
  diags = {}
  models = {"merged": merged, **arm_dirs}
  for label, mdir in models.items():
    m = artifact.read(mdir)
    taus = a.taus if label in ("merged", "recipe") else [1.0]
    key = {"fingerprint": m.manifest["fingerprint"], "taus": taus, "rows": a.diag_rows, "seq": a.diag_seq}
    path = os.path.join(wd, f"diag_{label}.json")
    if os.path.exists(path):
      with open(path) as f:
        cached = json.load(f)
      if cached.get("key") == key:
        diags[label] = cached["report"]
        continue
    t1 = time.time()
    rows = routing.domain_rows(m.tokenizer, list(config.domains), seq_len=a.diag_seq, max_rows=a.diag_rows,
                               mask_system=True)
    experts = ["general" if i == 0 else e for i, e in enumerate(m.manifest["experts"])]
    report = routing.token_diagnostics(m.params, m.cfg, rows, experts, taus=taus)
    report["seconds"] = round(time.time() - t1, 1)
    with open(path + ".tmp", "w") as f:
      json.dump({"key": key, "report": report}, f)
    os.replace(path + ".tmp", path)
    diags[label] = report

  # The table.
  result = {"command": a.command, "n": a.n, "expert": a.expert, "capabilities": names, "arms": {}, "timings": timings}
  lines = [f"# Router arms on the testbed: {a.n} capabilities, {a.expert} experts", "",
           f"Made by: `{a.command}`.", "",
           "Score = greedy match on held-out items (n per capability below, 95% Wilson interval); retention = "
           "(arm - base) / (branch - base) on the same items, paired bootstrap 95% interval (undefined where the "
           "branch's own gain is not significant); own = the capability's own expert's mean router weight on its "
           f"held-out tokens (layer mean, shared system prompt masked; uniform = {1 / (a.n + 1):.3f}), (rank).", ""]
  base_items = {n: _items(base_eval, n)[0] for n in names}
  branch_items = {n: _items(branch_evals[n], n)[0] for n in names}
  evals_by_arm = {"merged": merged_eval, **arm_evals}
  header = "| capability | n | base | branch | " + " | ".join(
      f"{arm}: score, retention [95%], own (rank)" for arm in evals_by_arm) + " |"
  lines += [header, "|---" * (4 + len(evals_by_arm)) + "|"]
  for d, name in zip(config.domains, names):
    ids = sorted(base_items[name])
    b = np.array([base_items[name][i] for i in ids])
    s = np.array([branch_items[name][i] for i in ids])
    cells = [name, str(len(ids)), f"{100 * b.mean():.1f}", f"{100 * s.mean():.1f}"]
    for arm, edir in evals_by_arm.items():
      got = _items(edir, name)[0]
      m_ = np.array([got[i] for i in ids])
      r = stats.retention(b, s, m_)
      own = diags.get(arm, {}).get("own", {}).get("1", {}).get(name)
      result["arms"].setdefault(arm, {})[name] = {"score": float(m_.mean()), "retention": r, "own": own}
      ret = (f"{100 * r['retention']:.0f}% [{100 * r['ci'][0]:.0f}, {100 * r['ci'][1]:.0f}]" if r["defined"]
             else "undefined")
      cells.append(f"{100 * m_.mean():.1f}, {ret}, " + (f"{own['weight']:.2f} ({own['rank']})" if own else "-"))
    lines.append("| " + " | ".join(cells) + " |")
  if topk_evals:
    lines += ["", "Top-k (the k largest router weights kept, not renormalised) against all experts, paired:", "",
              "| arm | k | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
    for (arm, k), edir in topk_evals.items():
      cells = [arm, str(k)]
      for name in names:
        full, _, _ = _items(arm_evals[arm], name)
        got, _, _ = _items(edir, name)
        ids = sorted(full)
        pb = stats.paired_bootstrap([full[i] for i in ids], [got[i] for i in ids])
        result.setdefault("top_k", {}).setdefault(f"{arm}_top{k}", {})[name] = pb
        cells.append(f"{100 * pb['change']:+.1f} [{100 * pb['ci'][0]:+.1f}, {100 * pb['ci'][1]:+.1f}]")
      lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Routing diagnostics (held-out tokens; tau = every router kernel x tau, the model run with it):", ""]
  for label, rep in diags.items():
    lines += [f"**{label}** ({rep.get('seconds', '?')} s)", "", routing.format_diagnostics(rep)]
  lines += ["CPU seconds of the steps run by this invocation (a resumed step counts 0): " +
            ", ".join(f"{os.path.relpath(k, wd) if k.startswith(wd) else k}: {v}" for k, v in timings.items()), ""]
  result["diagnostics"] = {k: {kk: v[kk] for kk in ("own", "entropy", "tokens")} for k, v in diags.items()}
  os.makedirs(a.results, exist_ok=True)
  md = os.path.join(a.results, a.name + ".md")
  with open(md, "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(a.results, a.name + ".json"), "w") as f:
    json.dump(result, f, indent=1, default=float)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  run_main(main)
