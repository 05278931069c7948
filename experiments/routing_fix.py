"""What makes the merged model route each domain's tokens to that domain's expert?

  python experiments/routing_fix.py --quick          # tiny random models, 2 domains: minutes on 2 CPU cores
  python experiments/routing_fix.py                  # SmolLM2-135M, 4 domains, the default run's branch budgets
  python experiments/routing_fix.py --expert_init=runs/smollm2_pretrained   # + the recipe's pretrained-FFN arm

Arms (every branch uses configs/bar_smollm2.py's recipe, :tiny under --quick, plus the arm's change):
  zeros          router starts at 0 inside the branches (this library's old default)
  random         OLMo-core's default router init (truncated normal, std 0.02): the recipe's
  random_lr<m>   random, and the router's learning rate x m inside the branches (--router_lr_mult)
  pretrained     random, and the domain expert starts from --expert_init's FFN (the recipe: the pre-trained model)
  embed          [beyond the paper] the random arm's merged model with every layer's router column i set from
                 domain i's mean token embedding (centred over the domains, unit length, x --embed_scale), as FlexOlmo
                 (and Nexus) initialise router rows from domain embeddings; column 0 (anchor) from general data.
Each arm's merged model (shared weights averaged over base + N, all experts on) is measured as merged, then after
router training at two budgets: `short` (the pipeline's capped router steps) and `full` (the recipe: 2 epochs of the
5% stratified sample; --skip_full leaves it out).

Measure: for each domain, the mean router weight of its own expert on its held-out tokens (layer mean; packed rows
of configs' routing settings), with a 95% interval over rows (t quantile; rows are the independent units), and the
rank of its own expert among all experts (1 = it gets the most weight). 1/E is what a uniform router gives.
Writes experiments/results/routing_fix[_quick].md and .json; artifacts and heatmaps under --workdir.
"""
from __future__ import annotations

import argparse
import json
import os

from bar_jax.errors import run_main  # light: no jax import before the device flags are set
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="tiny random models (configs/bar_smollm2.py:tiny), 2 domains")
  ap.add_argument("--domains", default="", help="default: math,tool_use (--quick) or the pipeline's four")
  ap.add_argument("--arms", default="zeros,random,random_lr,embed", help="which arms (pretrained needs --expert_init)")
  ap.add_argument("--router_lr_mult", type=float, default=10.0)
  ap.add_argument("--expert_init", default="", help="a dense artifact whose FFN seeds the domain experts")
  ap.add_argument("--embed_scale", type=float, default=1.0, help="length of each domain-embedding router column")
  ap.add_argument("--skip_full", action="store_true", help="leave out the full (2-epoch) router budget")
  ap.add_argument("--rows", type=int, default=0, help="held-out rows per domain (default 8 quick / 16)")
  ap.add_argument("--workdir", default="")
  ap.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"))
  a = ap.parse_args(argv)
  a.variant = "tiny" if a.quick else None
  a.workdir = a.workdir or os.path.join("runs", "routing_fix" + ("_quick" if a.quick else ""))
  a.command = "python " + " ".join(["experiments/routing_fix.py"] + list(argv if argv is not None else sys.argv[1:]))
  return a


# ----------------------------------------------------------------------------------------------------------------
# The beyond-the-paper arm's router: pure numpy.

def domain_embedding_router(embedding: np.ndarray, domain_tokens: list[np.ndarray], n_layers: int,
                            scale: float) -> np.ndarray:
  """[L, D, E] router whose column e (the same in every layer) is the unit-length mean token embedding of domain e's
  tokens minus the mean over the domains (what tells them apart), x scale."""
  means = np.stack([embedding[t.ravel()].astype(np.float64).mean(0) for t in domain_tokens])  # [E, D]
  cols = means - means.mean(0, keepdims=True)
  cols /= np.maximum(np.linalg.norm(cols, axis=1, keepdims=True), 1e-12)
  return np.broadcast_to((scale * cols.T)[None], (n_layers,) + cols.T.shape).astype(np.float32).copy()


def own_weight_stats(per_row: np.ndarray) -> dict:
  """per_row [R] -> mean, 95% t interval half-width, n rows."""
  from scipy import stats
  n = len(per_row)
  mean = float(per_row.mean())
  half = float(stats.t.ppf(0.975, n - 1) * per_row.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
  return {"mean": round(mean, 4), "ci95": round(half, 4), "n_rows": n}


# ----------------------------------------------------------------------------------------------------------------
# Steps (each skipped when its artifact is complete, so a killed run resumes).

def main(argv=None):
  a = parse(argv)
  from bar_jax import config_files
  from bar_jax.errors import BarError
  from bar_jax.evals import routing
  from bar_jax.io import models
  from bar_jax.stages import pipeline

  pcfg = config_files.stage_config("bar_smollm2", a.variant)
  domains = [d for d in (a.domains or ("math,tool_use" if a.quick else ",".join(pcfg.domains))).split(",") if d]
  arms = [x for x in a.arms.split(",") if x]
  if a.expert_init and "pretrained" not in arms:
    arms.append("pretrained")
  if "pretrained" in arms and not a.expert_init:
    raise BarError("arm 'pretrained' needs --expert_init=<a dense artifact> (e.g. the pre-trained SmolLM2-135M)")
  unknown = sorted(set(arms) - {"zeros", "random", "random_lr", "pretrained", "embed"})
  if unknown:
    raise BarError(f"unknown arms {unknown}: use zeros, random, random_lr, pretrained, embed")
  os.makedirs(a.workdir, exist_ok=True)
  pipeline.compilation_cache(pcfg, a.workdir)
  base_step = pipeline.plan(pcfg, a.workdir)[0]  # the pipeline's base step: WORKDIR/base
  if not base_step.done():
    base_step.run()
  base_dir = base_step.outdir

  branch_arms = {"zeros": {"router_init": "zeros"}, "random": {"router_init": "random"},
                 "random_lr": {"router_init": "random", "router_lr_mult": a.router_lr_mult},
                 "pretrained": {"router_init": "random", "expert_init": a.expert_init}}
  needed = sorted({"random" if x == "embed" else x for x in arms}, key=list(branch_arms).index)

  def run_stage(out, config):
    """A stage step by identity: reused when finished with these settings and inputs, else (moved aside and) run."""
    step = pipeline.Step(os.path.relpath(out, a.workdir), config.stage, out, config)
    if not step.done():
      print(f"[routing_fix] {step.name}", flush=True)
      step.run()
    return out

  merged = {}
  for arm in needed:
    dirs = []
    for d in domains:
      bc = pipeline.branch_config(pcfg, d, base_dir)
      over = dict(branch_arms[arm])
      mult = over.pop("router_lr_mult", None)
      bc = config_files.apply_overrides(bc, over)
      if mult is not None:
        for name in bc.phases:
          bc.phases[name].opt.router_lr_mult = float(mult)
      dirs.append(run_stage(os.path.join(a.workdir, arm, f"branch_{d}"), bc))
    mc = config_files.stage_config("merge", None, pcfg.merge)
    mc.branches, mc.base = ",".join(dirs), base_dir
    merged[arm] = run_stage(os.path.join(a.workdir, arm, "merged"), mc)

  if "embed" in arms:
    merged["embed"] = embed_merged(a, merged["random"], domains)

  rc0 = pipeline.router_config(pcfg, merged[needed[0]])
  rows_n = a.rows or (8 if a.quick else 16)
  budgets = {"merged": None, "short": int(rc0.router.max_steps) or None}
  if not a.skip_full:
    budgets["full"] = 0  # max_steps 0: the recipe's 2 epochs of the stratified sample
  results = []
  base = models.load_model(base_dir)
  rows = routing.domain_rows(base.tokenizer, domains + ["general"], seq_len=int(rc0.routing.seq_len),
                             max_rows=rows_n)
  for arm in arms:
    for budget, steps in budgets.items():
      if budget == "merged":
        model_dir = merged[arm]
      else:
        rc = pipeline.router_config(pcfg, merged[arm])
        rc.router.max_steps = steps
        model_dir = run_stage(os.path.join(a.workdir, arm, f"routed_{budget}"), rc)
      results.append(measure(a, arm, budget, model_dir, rows))
  write(a, domains, results)


def embed_merged(a, merged_dir: str, domains: list[str]) -> str:
  from bar_jax import pytree
  from bar_jax.evals import routing
  from bar_jax.io import models
  from bar_jax.io import workdir
  out = os.path.join(a.workdir, "embed", "merged")
  settings = {"scale": a.embed_scale, "rows": 8, "seq_len": 128, "split": "train"}
  identity = dict(settings, stage="router_from_domain_embeddings", input=workdir.input_fingerprint(merged_dir))
  state, found = workdir.recorded(out)
  if state == workdir.FINISHED and found == identity:
    return out
  if found != identity:
    workdir.set_aside(out)  # made from another merged model or with other settings: kept, made again
  m = models.load_model(merged_dir)
  experts = list(m.manifest["experts"])  # ["anchor", domain...]
  rows = routing.domain_rows(m.tokenizer, ["general"] + experts[1:], seq_len=128, max_rows=8, split="train")
  tokens = [rows[d]["inputs"] for d in ["general"] + experts[1:]]
  flat = dict(pytree.flatten(m.params))
  emb = np.asarray(flat["embed/embedding"])
  flat["layers/moe/router/kernel"] = domain_embedding_router(emb, tokens, m.cfg.n_layers, a.embed_scale)
  record = {"stage": "router_from_domain_embeddings", "steps": 0, "tokens": 0, "flops": 0, "config": settings}
  return models.write_artifact(out, m, pytree.unflatten(flat), m.cfg, "moe", [record],
                               [dict(m.manifest, role="input")], identity=identity, experts=experts,
                               base_fingerprint=m.manifest.get("base_fingerprint"),
                               merge_rule=m.manifest.get("merge_rule"), note="beyond the paper: router columns from "
                               "domain embeddings (FlexOlmo/Nexus style)")


def measure(a, arm: str, budget: str, model_dir: str, rows: dict) -> dict:
  from bar_jax.evals import routing
  from bar_jax.io import models
  m = models.load_model(model_dir)
  names = list(m.manifest.get("experts") or [])
  report = routing.weight_table(m.params, m.cfg, rows, batch_size=1, names=names)
  report["title"] = f"{arm}, {budget}"
  routing.write(report, os.path.join(a.workdir, "tables", f"{arm}_{budget}"), stat="mean_weight")
  summ = routing.weight_summary(report)
  per_domain = {}
  for d, r in rows.items():
    if d not in names or d not in report["domains"]:
      continue
    e = names.index(d)
    per_row = []
    for i in range(len(r["inputs"])):  # one row at a time: the interval's independent units
      one = {d: {k: v[i:i + 1] for k, v in r.items()}}
      w = routing.weight_table(m.params, m.cfg, one, batch_size=1, names=names)["domains"][d]["mean_weight"]
      per_row.append(float(np.mean(np.asarray(w)[:, e])))
    per_domain[d] = dict(own_weight_stats(np.asarray(per_row)), rank=summ[d]["own_rank"],
                         tokens=report["domains"][d]["tokens"])
  steps = sum(s.get("steps", 0) for s in m.manifest.get("stages", []) if s.get("stage") == "router")
  print(f"[routing_fix] {arm:>10} {budget:>6}: " + ", ".join(f"{d} {v['mean']:.3f}" for d, v in per_domain.items()),
        flush=True)
  return {"arm": arm, "budget": budget, "router_steps": steps, "n_experts": m.cfg.n_experts, "domains": per_domain,
          "table": summ, "model": os.path.relpath(model_dir, a.workdir)}


def write(a, domains: list[str], results: list[dict]) -> None:
  stem = os.path.join(a.results, "routing_fix" + ("_quick" if a.quick else ""))
  os.makedirs(a.results, exist_ok=True)
  e = results[0]["n_experts"]
  head = ("| arm | router budget (steps) | " + " | ".join(f"{d}: own weight ± 95% (rank)" for d in domains)
          + " | mean own weight |")
  model = "tiny, --quick" if a.quick else "SmolLM2-135M"
  lines = [f"# Routing fix: the merged model's weight on each domain's own expert ({model})",
           "", f"Made by: `{a.command}`", "",
           f"Own weight = mean router weight (layer mean) of the domain's expert on its held-out tokens; 95% t "
           f"interval over packed rows (n rows each, below); rank 1 = the largest of the {e} experts; a uniform "
           f"router gives {1 / e:.3f}. `embed` is beyond the paper (FlexOlmo/Nexus-style router init).", "",
           head, "|---" * (len(domains) + 3) + "|"]
  for r in results:
    cells = []
    for d in domains:
      v = r["domains"].get(d)
      cells.append("n/a" if v is None else f"{v['mean']:.3f} ± {v['ci95']:.3f} ({v['rank']})")
    own = [r["domains"][d]["mean"] for d in domains if d in r["domains"]]
    lines.append(f"| {r['arm']} | {r['budget']} ({r['router_steps']}) | " + " | ".join(cells)
                 + f" | {np.mean(own):.3f} |")
  n_rows = {d: v["n_rows"] for d, v in results[0]["domains"].items()}
  lines += ["", f"Rows per domain: {n_rows}; tokens per domain: "
            f"{ {d: v['tokens'] for d, v in results[0]['domains'].items()} }.", ""]
  text = "\n".join(lines) + "\n"
  with open(stem + ".md", "w") as f:
    f.write(text)
  with open(stem + ".json", "w") as f:
    json.dump({"command": a.command, "results": results}, f, indent=1)
  print(text, flush=True)


if __name__ == "__main__":
  run_main(main)
