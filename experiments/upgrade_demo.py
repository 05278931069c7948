"""Upgrade one expert of a finished BAR pipeline run: a newer branch of one domain goes in, only the router retrains.

  python experiments/upgrade_demo.py --workdir=runs/bar_smollm2 --domain=tool_use --sft_steps=40   # ~45 min, 2-core CPU
  python experiments/upgrade_demo.py --workdir=runs/bar_smollm2 --updates=full,local               # + local router

WORKDIR is a finished `configs/bar_smollm2.py` run (it needs WORKDIR/routed). Using the same config as that run, this
trains WORKDIR/branch_<domain>_v2 from the same base with more SFT steps (--sft_steps; only the step count changes),
swaps its expert into WORKDIR/routed with configs/upgrade.py (router_update=full: the paper's router retraining on
the stratified sample of all domains; local: only the new expert's router column, on the new domain plus replay),
evaluates everything with the run's eval settings, and writes experiments/results/upgrade_<domain>_<run>.md/.json:
the table (bar before, bar after each upgrade, the old and new branch), each domain's change with the 95% interval
of the change and the p of a paired test over the same items (exact McNemar for rates, paired bootstrap for NLL;
bar_jax.evals.report.compare), and which experts are bit-identical to the input's (every expert but the replaced
one must be).

Expected: the upgraded domain rises about as much as branch v2 beats branch v1; no other domain changes
significantly (only the router changed for them); experts 0..E-1 except the replaced one: identical.
"""
from __future__ import annotations

import argparse
import json
import os
import sys



def _eval_row(pipeline, config, model_dir: str, edir: str, label: str) -> dict:
  return dict(pipeline.evaluate_once(config, model_dir, edir), name=label)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="runs/bar_smollm2", help="a finished bar_smollm2 pipeline run")
  ap.add_argument("--config", default="configs/bar_smollm2.py", help="that run's config (optionally :variant)")
  ap.add_argument("--domain", default="tool_use")
  ap.add_argument("--sft_steps", type=int, default=40, help="SFT steps of the newer branch (the run's default: 20)")
  ap.add_argument("--updates", default="full", help="router updates to compare: full, local or full,local")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = ap.parse_args(argv)

  from bar_jax import config_files
  from bar_jax.errors import BarError
  from bar_jax.evals import report
  from bar_jax.io import artifact
  from bar_jax.stages import pipeline
  from bar_jax.transforms import upgrade as upgrade_lib
  path, _, variant = args.config.partition(":")
  config = config_files.stage_config(os.path.splitext(os.path.basename(path))[0], variant or None)
  routed, base = os.path.join(args.workdir, "routed"), os.path.join(args.workdir, "base")
  old_branch = os.path.join(args.workdir, f"branch_{args.domain}")
  for need in (routed, base, old_branch):
    if not artifact.is_complete(need):
      raise BarError(f"{need} is not a finished artifact: run the pipeline first "
                     f"(python -m bar_jax.train --config={args.config} --workdir={args.workdir})")

  def run_step(step):  # by identity: reused when finished with these settings and inputs, else (moved aside and) run
    if not step.done():
      step.run()
    return step.outdir

  new_branch = os.path.join(args.workdir, f"branch_{args.domain}_v2")
  bc = pipeline.branch_config(config, args.domain, base)
  bc.phases.sft.steps = args.sft_steps
  run_step(pipeline.Step(os.path.basename(new_branch), "branch", new_branch, bc))
  upgraded = {}
  for update in [u.strip() for u in args.updates.split(",") if u.strip()]:
    out = os.path.join(args.workdir, f"upgraded_{args.domain}_{update}")
    uc = config_files.stage_config("upgrade", config.router.get("arg") or None, config.router.overrides)
    uc.model, uc.branch, uc.router_update = routed, new_branch, update
    uc.eval = type(uc)(dict(uc.eval.to_dict(), domains="", before=False))  # evaluated below
    upgraded[update] = run_step(pipeline.Step(os.path.basename(out), "upgrade", out, uc))

  edir = lambda label: os.path.join(args.workdir, "eval", label)
  rows = [_eval_row(pipeline, config, routed, edir("bar"), "bar (before)")]
  rows += [_eval_row(pipeline, config, d, edir(f"bar_upgraded_{args.domain}_{u}"), f"bar upgraded ({u} router)")
           for u, d in upgraded.items()]
  rows += [_eval_row(pipeline, config, old_branch, edir(f"branch_{args.domain}"), f"branch_{args.domain} (v1)"),
           _eval_row(pipeline, config, new_branch, edir(f"branch_{args.domain}_v2"),
                     f"branch_{args.domain}_v2 ({args.sft_steps} SFT steps)")]
  report.check_same_settings(rows)

  before = rows[0]["domains"]
  m_in = artifact.read_manifest(routed)
  experts = m_in.get("experts", [])
  changes, identity = {}, {}
  lines = [f"# Upgrading the {args.domain} expert of `{args.workdir}`\n",
           f"Made by: `python experiments/upgrade_demo.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
           report.format_table(rows), report.settings_note(rows), "",
           "| upgrade | " + " | ".join(f"{d} change [95% CI] (p)" for d in before) + " | experts bit-identical |",
           "|---" * (len(before) + 2) + "|"]
  for u, d in upgraded.items():
    after = next(r for r in rows if r["name"] == f"bar upgraded ({u} router)")["domains"]
    tests = report.compare(rows[0], next(r for r in rows if r["name"] == f"bar upgraded ({u} router)"))
    changes[u] = {dom: {"before": before[dom]["value"], "after": after[dom]["value"],
                        "change": after[dom]["value"] - before[dom]["value"],
                        "change_ci": tests.get(dom, {}).get("ci"), "p": tests.get(dom, {}).get("p"),
                        "test": tests.get(dom, {}).get("test")} for dom in before}
    fp_in, fp_out = m_in.get("expert_fingerprints", {}), artifact.read_manifest(d).get("expert_fingerprints", {})
    changed = upgrade_lib.changed_experts(fp_in, fp_out) if fp_in and fp_out else list(range(len(experts)))
    identity[u] = [name for i, name in enumerate(experts) if i not in changed]
    cells = [f"{c['change']:+.3g}" + (f" [{c['change_ci'][0]:+.3g}, {c['change_ci'][1]:+.3g}] (p={c['p']:.2g})"
                                      if c["change_ci"] else " (no per-item outcomes)") for c in changes[u].values()]
    lines.append(f"| {u} router | " + " | ".join(cells) + f" | {', '.join(identity[u]) or 'none'} |")
  text = "\n".join(lines) + "\n"
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"upgrade_{args.domain}_{os.path.basename(os.path.normpath(args.workdir))}")
  with open(stem + ".md", "w") as f:
    f.write(text)
  with open(stem + ".json", "w") as f:
    json.dump({"command": lines[1], "changes": changes, "bit_identical_experts": identity,
               "rows": [{k: v for k, v in r.items() if k != "domains"} | {"scores": {d: x["score"] for d, x in
                                                                                       r["domains"].items()}}
                        for r in rows]}, f, indent=1, default=str)
  print(text)


if __name__ == "__main__":
  main()
