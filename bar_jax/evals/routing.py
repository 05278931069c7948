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


def pack_rows(conversations: Sequence[Sequence[int]], seq_len: int, max_rows: int,
              masks: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
  """Token id lists -> {inputs, positions, segment_ids, mask} [R, seq_len], every slot a real token (the tail that
  does not fill a row is dropped). A sequence cut by a row edge continues in the next row as a new segment from
  position 0. mask: 1 where a token counts in the statistics (`masks` per conversation; default all 1)."""
  stream, seg, pos, keep = [], [], [], []
  for i, ids in enumerate(conversations):
    stream += list(ids)
    seg += [i] * len(ids)
    pos += list(range(len(ids)))
    keep += list(masks[i]) if masks is not None else [1] * len(ids)
  n = min(len(stream) // seq_len, max_rows)
  if n == 0:
    return {k: np.zeros((0, seq_len), np.int32) for k in ("inputs", "positions", "segment_ids", "mask")}
  ids = np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)
  seg = np.asarray(seg[:n * seq_len]).reshape(n, seq_len)
  pos = np.asarray(pos[:n * seq_len]).reshape(n, seq_len)
  # Renumber segments 1.. within each row; a segment continued from the previous row restarts its positions at 0.
  new_seg = np.concatenate([np.ones((n, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  segment_ids = np.cumsum(new_seg, axis=1).astype(np.int32)
  first = pos[:, :1]
  positions = np.where(segment_ids == 1, pos - first, pos).astype(np.int32)
  mask = np.asarray(keep[:n * seq_len], np.int32).reshape(n, seq_len)
  return {"inputs": ids, "positions": positions, "segment_ids": segment_ids, "mask": mask}


def system_mask(tokenizer, messages: Sequence[dict], ids: Sequence[int]) -> list[int]:
  """1 on every token but the default system prompt the template adds to a conversation without a system turn (it
  is the same in every domain, so it tells none apart: left out of routing statistics and router fits); a
  conversation's own system turn (e.g. tool use's function list) is domain content and stays in."""
  if not messages or messages[0]["role"] == "system" or tokenizer.chat.get("default_system") is None:
    return [1] * len(ids)
  bare, _ = tokenizer.render_chat([{"role": "user", "content": ""}])
  user, _ = tokenizer.render_chat([{"role": "system", "content": ""}, {"role": "user", "content": ""}])
  # The default block is the prefix the template adds before the user turn: its length is the rendering of an
  # empty user turn minus what that turn takes after an (empty) explicit system turn.
  n = len(bare) - (len(user) - len(tokenizer.render_chat([{"role": "system", "content": ""}])[0]))
  if n <= 0 or list(ids[:n]) != list(bare[:n]):
    raise ValueError("system_mask: the template's default system block is not a token prefix of the conversation")
  return [0] * n + [1] * (len(ids) - n)


def conversation_rows(tokenizer, conversations, *, seq_len: int, max_rows: int,
                      mask_system: bool = True, replies_only: bool = False) -> dict[str, np.ndarray]:
  """Conversations (message lists) rendered with the chat template and packed by pack_rows; with mask_system the
  system block is masked out (`system_mask`); with replies_only only the assistant's tokens count (the loss mask:
  the tokens a model generates, where routing decides the score)."""
  convs, masks, need = [], [], seq_len * max_rows
  for messages in conversations:
    ids, loss_mask = tokenizer.render_chat(messages)
    convs.append(ids)
    if replies_only:
      masks.append(list(loss_mask))
    else:
      masks.append(system_mask(tokenizer, messages, ids) if mask_system else [1] * len(ids))
    need -= len(ids)
    if need <= 0:
      break
  return pack_rows(convs, seq_len, max_rows, masks)


def domain_rows(tokenizer, domains: Sequence[str], *, seq_len: int = 256, max_rows: int = 8,
                split: str = "eval", mask_system: bool = False,
                replies_only: bool = False) -> dict[str, dict[str, np.ndarray]]:
  """Each capability's held-out conversations (every token of the template), packed by pack_rows; with
  mask_system the shared system prompt is masked out of the statistics that read `mask` (`token_diagnostics`), with
  replies_only everything but the assistant's replies."""
  from bar_jax.data import capability
  return {d.name: conversation_rows(tokenizer, d.chat_examples(split), seq_len=seq_len, max_rows=max_rows,
                                    mask_system=mask_system, replies_only=replies_only)
          for d in capability.resolve(list(domains))}


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


# ----------------------------------------------------------------------------------------------------------------
# Token-level diagnostics: why a router does or does not carry each domain to its expert.

TAUS = (1.0, 3.0, 10.0, 30.0)


def _batches(rows: Mapping[str, Mapping[str, np.ndarray]], batch_size: int) -> list[tuple[str, dict]]:
  out = []
  for d, r in rows.items():
    for i in range(0, len(r["inputs"]), batch_size):
      out.append((d, {k: np.asarray(v[i:i + batch_size]) for k, v in r.items()}))
  return out


def _route_np(kernel: np.ndarray, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """The combine weights [N, E] the model applies (model.moe.route: softmax in float32, top-k, norm_topk)."""
  from bar_jax.model import moe
  return np.asarray(moe.route(jax.numpy.asarray(kernel), jax.numpy.asarray(x), cfg)[0], np.float64)


def token_diagnostics(params, cfg: ModelConfig, rows: Mapping[str, Mapping[str, np.ndarray]], names: Sequence[str],
                      *, taus: Sequence[float] = TAUS, batch_size: int = 8, compute: Compute = Compute()
                      ) -> dict[str, Any]:
  """Per domain, over its rows' masked tokens (`domain_rows(..., mask_system=True)`), at each sharpening tau (every
  layer's router kernel x tau, the model run with it, so later layers see the sharper routing):

    weights[tau][d]   [L][E] mean combine weight per layer and expert
    own[tau][d]       the layer mean of the weight of d's own expert (the expert named d), and its rank (1 = most)
    entropy[tau][d]   mean per-token entropy of the weights, in nats (log E = uniform)
  and at tau = 1 the column contrast M[d][l][i] = mean over d's tokens of x . (c_i - mean_j c_j): rows that look
  alike for every domain mean the columns carry no domain information. A rising own weight with tau means the
  columns point the right way but are too small (budget, lr); the same expert winning everywhere means they do not.
  """
  if cfg.ffn != "moe":
    raise ValueError("routing diagnostics need an MoE model")
  names = list(names)
  batches = _batches(rows, batch_size)
  masks = [np.asarray(b["mask"], bool) for _, b in batches]
  report: dict[str, Any] = {"experts": names, "taus": [float(t) for t in taus], "top_k": cfg.k,
                            "tokens": {d: int(sum(m.sum() for (dd, _), m in zip(batches, masks) if dd == d))
                                       for d in rows},
                            "weights": {}, "own": {}, "entropy": {}, "contrast": {}}
  kernel0 = np.asarray(params["layers"]["moe"]["router"]["kernel"])
  for tau in taus:
    sums = {d: np.zeros((cfg.n_layers, cfg.n_experts)) for d in rows}
    ent = {d: np.zeros(cfg.n_layers) for d in rows}
    contrast = {d: np.zeros((cfg.n_layers, cfg.n_experts)) for d in rows}

    def visit(layer, inputs, kernel):
      centred = kernel - kernel.mean(-1, keepdims=True)
      for (d, _), h, m in zip(batches, inputs, masks):
        x = h[m]
        w = _route_np(kernel, x, cfg)
        sums[d][layer] += w.sum(0)
        ent[d][layer] += float(-(w * np.log(np.maximum(w, 1e-30))).sum())
        if tau == 1.0:
          contrast[d][layer] += (x.astype(np.float64) @ centred).sum(0)
      return None

    scaled = dict(params, layers=dict(params["layers"], moe=dict(params["layers"]["moe"],
                                                                 router={"kernel": kernel0 * np.float32(tau)})))
    transformer.layerwise(scaled, [{k: b[k] for k in ("inputs", "positions", "segment_ids")} for _, b in batches],
                          cfg, visit, compute=compute)
    key = f"{tau:g}"
    report["weights"][key], report["own"][key], report["entropy"][key] = {}, {}, {}
    for d in rows:
      n = max(report["tokens"][d], 1)
      w = sums[d] / n
      report["weights"][key][d] = w.round(5).tolist()
      report["entropy"][key][d] = round(float(ent[d].mean() / n), 4)
      if d in names:
        mean_w = w.mean(0)
        own = names.index(d)
        report["own"][key][d] = {"weight": round(float(mean_w[own]), 4),
                                 "rank": int(1 + np.sum(mean_w > mean_w[own]))}
      if tau == 1.0:
        report["contrast"][d] = (contrast[d] / n).round(4).tolist()
  return report


def column_updates(kernel: np.ndarray, init: np.ndarray) -> dict[str, Any]:
  """How far each router column moved from where it started. kernel [L, D, E] (a merged router), init [L, D, E]
  (each column's start: for a merge, the branches' shared init: column 0 = r0, every other = r1). Per column: the
  layer-mean L2 norm and the max-abs of delta_i = c_i - init_i (Adam moves a coordinate by at most about the summed
  lr: a max-abs near it means saturated, budget-limited updates), and the layer-mean cosine matrix of the deltas
  (near 1 off the diagonal: one common push, e.g. the z-loss or the mean input, not domain information)."""
  delta = np.asarray(kernel, np.float64) - np.asarray(init, np.float64)
  norms = np.linalg.norm(delta, axis=1)                                  # [L, E]
  unit = delta / np.maximum(norms[:, None, :], 1e-30)
  cos = np.einsum("lde,ldf->lef", unit, unit).mean(0)
  return {"l2": norms.mean(0).round(6).tolist(), "max_abs": np.abs(delta).max((0, 1)).round(6).tolist(),
          "cosine": cos.round(4).tolist(), "init_l2": np.linalg.norm(init, axis=1).mean(0).round(6).tolist()}


def own_share(report: Mapping[str, Any], tau: str, domain: str) -> dict[str, Any]:
  """Domain d's own expert among the domain experts alone (the anchor, expert 0, left out): its share of their
  weight, own / (1 - anchor), layer means, and its rank among them. A router that keeps each domain on {anchor, own
  expert} in its branch's split can give the own expert little weight and still carry the domain: this says whether
  the rest of the weight goes to the anchor or to the wrong experts."""
  mean_w = np.asarray(report["weights"][tau][domain], np.float64).mean(0)
  own = list(report["experts"]).index(domain)
  others = np.delete(mean_w, [0, own])
  return {"share": round(float(mean_w[own] / max(1.0 - mean_w[0], 1e-30)), 4),
          "rank": int(1 + np.sum(others > mean_w[own]))}


def format_diagnostics(report: Mapping[str, Any]) -> str:
  """Markdown: own-expert weight (rank) per domain at each tau, its share of the domain experts' weight, and the
  mean entropy."""
  domains = [d for d in report["tokens"] if d in report["experts"]]
  lines = ["| tau | " + " | ".join(f"{d}: own weight (rank); share of the experts" for d in domains)
           + " | mean own | entropy (nats) |",
           "|---" * (len(domains) + 3) + "|"]
  for tau in report["weights"]:
    own = report["own"][tau]
    mean_own = np.mean([own[d]["weight"] for d in domains]) if domains else float("nan")
    ent = np.mean([report["entropy"][tau][d] for d in report["tokens"]])
    lines.append(f"| {tau} | " + " | ".join(f"{own[d]['weight']:.3f} ({own[d]['rank']}); "
                                            f"{own_share(report, tau, d)['share']:.2f}" for d in domains)
                 + f" | {mean_own:.3f} | {ent:.3f} |")
  return "\n".join(lines) + "\n"
