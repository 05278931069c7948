"""Routing diagnostics: per domain and per layer, where the router sends tokens.

For each domain, a few held-out conversations are rendered (chat template, every token) and packed edge to edge into
rows of seq_len real tokens, so per-batch router means are exact token means (no padding). Per layer and expert:

  top_k_share   share of top-k assignments (the model's own top_k; uniform when every expert runs, top_k = E)
  top1_share    share of tokens whose highest-probability expert it is (informative whatever top_k is)
  mean_prob     mean router probability

`write(report, dir)` saves routing.json and routing.png (one heatmap per domain: layers x experts, top-1 share, plus
a domains x experts panel of the layer means).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from bar_jax.model import transformer
from bar_jax.model.config import Compute, ModelConfig

ROUTING_JSON, ROUTING_PNG = "routing.json", "routing.png"
STATS = ("top_k_share", "top1_share", "mean_prob", "mean_weight")


def pack_rows(conversations: Sequence[Sequence[int]], seq_len: int, max_rows: int) -> dict[str, np.ndarray]:
  """Token id lists -> {inputs, positions, segment_ids} [R, seq_len], every slot a real token (the tail that does not
  fill a row is dropped). A sequence cut by a row edge continues in the next row as a new segment from position 0."""
  stream, seg, pos = [], [], []
  for i, ids in enumerate(conversations):
    stream += list(ids)
    seg += [i] * len(ids)
    pos += list(range(len(ids)))
  n = min(len(stream) // seq_len, max_rows)
  if n == 0:
    return {"inputs": np.zeros((0, seq_len), np.int32), "positions": np.zeros((0, seq_len), np.int32),
            "segment_ids": np.zeros((0, seq_len), np.int32)}
  ids = np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)
  seg = np.asarray(seg[:n * seq_len]).reshape(n, seq_len)
  pos = np.asarray(pos[:n * seq_len]).reshape(n, seq_len)
  # Renumber segments 1.. within each row; a segment continued from the previous row restarts its positions at 0.
  new_seg = np.concatenate([np.ones((n, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  segment_ids = np.cumsum(new_seg, axis=1).astype(np.int32)
  first = pos[:, :1]
  positions = np.where(segment_ids == 1, pos - first, pos).astype(np.int32)
  return {"inputs": ids, "positions": positions, "segment_ids": segment_ids}


def domain_rows(tokenizer, domains: Sequence[str], *, seq_len: int = 256, max_rows: int = 8,
                split: str = "eval") -> dict[str, dict[str, np.ndarray]]:
  """Each capability's held-out conversations (every token of the template), packed by pack_rows."""
  from bar_jax.data import capability
  out = {}
  for d in capability.resolve(list(domains)):
    convs, need = [], seq_len * max_rows
    for messages in d.chat_examples(split):
      ids, _ = tokenizer.render_chat(messages)
      convs.append(ids)
      need -= len(ids)
      if need <= 0:
        break
    out[d.name] = pack_rows(convs, seq_len, max_rows)
  return out


@functools.partial(jax.jit, static_argnames=("cfg", "compute", "mesh"))
def _router_means(params, inputs, positions, segment_ids, *, cfg: ModelConfig, compute: Compute, mesh=None):
  _, aux = transformer.forward(params, inputs, cfg, compute=compute, positions=positions, segment_ids=segment_ids,
                               mesh=mesh, return_hidden=True)
  return aux["expert_load"], aux["expert_top1"], aux["expert_prob"], aux["expert_weight"]


def routing_stats(params, cfg: ModelConfig, rows: Mapping[str, Mapping[str, np.ndarray]], *, batch_size: int = 8,
                  mesh=None, names: Sequence[str] | None = None, compute: Compute = Compute()) -> dict[str, Any]:
  """{"domains": {d: {stat: [L][E], "tokens": n}}, "experts": names, "top_k": k} from packed rows per domain."""
  if cfg.ffn != "moe":
    raise ValueError("routing diagnostics need an MoE model")
  out: dict[str, Any] = {"experts": list(names) if names else [f"expert{e}" for e in range(cfg.n_experts)],
                         "top_k": cfg.k, "n_experts": cfg.n_experts, "n_layers": cfg.n_layers, "domains": {}}
  for domain, r in rows.items():
    b = min(batch_size, len(r["inputs"]))
    n = len(r["inputs"]) // b * b if b else 0  # whole batches only: the means are exact token means
    if n == 0:
      continue
    sums = [np.zeros((cfg.n_layers, cfg.n_experts)) for _ in STATS]
    for i in range(0, n, b):
      stats = _router_means(params, r["inputs"][i:i + b], r["positions"][i:i + b], r["segment_ids"][i:i + b],
                            cfg=cfg, compute=compute, mesh=mesh)
      for s, v in zip(sums, stats):
        s += np.asarray(v, np.float64) * b
    out["domains"][domain] = {name: (s / n).round(6).tolist() for name, s in zip(STATS, sums)}
    out["domains"][domain]["tokens"] = int(n * r["inputs"].shape[1])
  return out


def weight_table(params, cfg: ModelConfig, rows: Mapping[str, Mapping[str, np.ndarray]], *, batch_size: int = 8,
                 mesh=None, names: Sequence[str] | None = None, compute: Compute = Compute()) -> dict[str, Any]:
  """The mean router weight each expert gets on each domain's tokens: the combine weight the model applies (after
  top-k and any renormalisation; the router probability when every expert runs), per layer, averaged over every
  token of the domain's packed rows. Same schema as routing_stats with the stat "mean_weight", so format_table and
  write(stat="mean_weight") give its table and heatmap; weight_summary gives the domains x experts table."""
  stats = routing_stats(params, cfg, rows, batch_size=batch_size, mesh=mesh, names=names, compute=compute)
  stats["domains"] = {d: {"mean_weight": v["mean_weight"], "tokens": v["tokens"]} for d, v in stats["domains"].items()}
  return stats


def weight_summary(report: Mapping[str, Any]) -> dict[str, Any]:
  """{domain: {"weights": [layer-mean weight per expert], "own": the weight of the domain's own expert (the expert
  of the same name; None for a domain without one, e.g. general), "own_rank": its rank among the experts (1 = the
  largest)}}."""
  experts = list(report["experts"])
  out = {}
  for d, v in report["domains"].items():
    w = np.mean(np.asarray(v["mean_weight"]), axis=0)
    own = experts.index(d) if d in experts else None
    out[d] = {"weights": w.round(4).tolist(), "own": None if own is None else round(float(w[own]), 4),
              "own_rank": None if own is None else int(1 + np.sum(w > w[own]))}
  return out


def summary(report: Mapping[str, Any], stat: str = "top1_share") -> dict[str, list[float]]:
  """{domain: [layer-mean share per expert]}: the domains x experts table."""
  return {d: np.mean(np.asarray(v[stat]), axis=0).round(4).tolist() for d, v in report["domains"].items()}


def format_table(report: Mapping[str, Any], stat: str = "top1_share") -> str:
  """Markdown: one row per domain, one column per expert, the layer-mean share in percent."""
  experts = report["experts"]
  lines = [f"| domain ({stat}, layer mean) | " + " | ".join(experts) + " |", "|---" * (len(experts) + 1) + "|"]
  for d, row in summary(report, stat).items():
    lines.append(f"| {d} | " + " | ".join(f"{100 * x:.1f}" for x in row) + " |")
  return "\n".join(lines) + "\n"


def write(report: Mapping[str, Any], directory: str, stat: str = "top1_share") -> tuple[str, str]:
  """routing.json and routing.png in directory; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(directory, exist_ok=True)
  jpath, ppath = os.path.join(directory, ROUTING_JSON), os.path.join(directory, ROUTING_PNG)
  with open(jpath + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
  os.replace(jpath + ".tmp", jpath)
  domains, experts = list(report["domains"]), report["experts"]
  n = len(domains) + 1
  fig, axes = plt.subplots(1, n, figsize=(2.2 + 0.5 * len(experts) * n, 0.2 * report["n_layers"] + 2.5),
                           squeeze=False)
  for i, (ax, d) in enumerate(zip(axes[0], domains)):
    im = ax.imshow(np.asarray(report["domains"][d][stat]), vmin=0, vmax=1, aspect="auto", cmap="viridis")
    ax.set_title(d, fontsize=9)
    ax.set_xticks(range(len(experts)), experts, rotation=60, fontsize=7)
    if i == 0:  # panels share the layer axis; labels on the others would overlap their left neighbours
      ax.set_ylabel("layer", fontsize=8)
    else:
      ax.set_yticklabels([])
  table = np.asarray([summary(report, stat)[d] for d in domains])
  ax = axes[0][-1]
  ax.imshow(table, vmin=0, vmax=1, aspect="auto", cmap="viridis")
  for (i, j), v in np.ndenumerate(table):
    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
  ax.set_title("layer mean", fontsize=9)
  ax.set_xticks(range(len(experts)), experts, rotation=60, fontsize=7)
  ax.set_yticks(range(len(domains)), domains, fontsize=7)
  ax.yaxis.tick_right()  # on the left they would overlap the last domain's panel
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=stat, pad=0.06)
  title = f"token share per expert ({stat}; model top_k={report['top_k']})"
  fig.suptitle(f"{report['title']}: {title}" if report.get("title") else title, fontsize=10)
  fig.savefig(ppath + ".tmp.png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  os.replace(ppath + ".tmp.png", ppath)
  return jpath, ppath
