"""Router columns computed from data, with no gradient steps: what makes a merged MoE route each domain's tokens to
that domain's expert.

Why this exists: after the merge, column i of each layer's router is branch i's column, trained only to tell "my
expert" from the anchor. No branch ever saw another domain, so nothing makes c_i beat c_j on domain i's tokens; the
columns tie, every expert gets ~1/E of every token, and the MoE is a soft average of its experts. These methods set
every column of every layer at once from the layer's own inputs on labelled tokens (label = the expert whose
domain the token comes from; general data = the anchor, expert 0):

  embed   domain embeddings (FlexOlmo / Nexus style): column e = the mean of the layer's inputs over expert e's
          tokens, centred over the experts (what tells them apart), the mean input's direction projected out, unit
          length.
  ridge   closed form (DUME style): the ridge regression from the layer's inputs to the one-hot expert labels,
          class-balanced, W = (X'WX + lam tr(X'WX)/D I)^-1 X'WY: one linear solve of size D per layer.

  split   every column fitted at once by softmax regression onto the branches' own splits: a domain-d token's
          target is branch d's anchor/expert-d split (from the merge's columns 0 and d), 0 for every other expert;
          class-balanced cross-entropy with the ridge's relative L2 penalty (L-BFGS). What `pair` approximates with
          one linear term, fitted directly, so the other experts are muted as hard as the penalty allows at any E.
  pair    the merge's columns kept, plus s x R, R the ridge regression onto "the anchor or my own expert" (1 at
          column 0 and at the token's expert, 0 elsewhere; general tokens: 1 at column 0 only). On domain d's
          tokens the other experts are pushed down by s while the anchor-vs-expert-d logit difference stays branch
          d's own, so each domain is routed as its branch was (the oracle row's routing), not sharper: a branch's
          expert learned under its own router's weight, and one-hot targets (ridge) over-apply it.

The columns (pair: R) are then multiplied by one scale per layer, the s > 0 that minimises the class-balanced
cross-entropy against the targets (embed, ridge: the one-hot labels of softmax(s x W); pair: the branch's
anchor/expert split of softmax(x K + s x R)), convex in s (a few Newton steps), so the logits come out at the
sharpness the data supports rather than at an arbitrary one. `fit` runs the model one layer at a time
(`transformer.layerwise`): layer l is fitted on inputs produced by the already-fitted layers below it, in one pass.
Pure: arrays in, arrays out.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bar_jax.errors import BarError
from bar_jax.model import transformer
from bar_jax.model.config import Compute, ModelConfig

METHODS = ("merged", "embed", "ridge", "pair", "split")  # merged = keep the merge's columns (the recipe)


def _class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
  """Per-token weights giving every class the same total weight 1/n_classes."""
  counts = np.bincount(labels, minlength=n_classes)
  missing = [e for e in range(n_classes) if counts[e] == 0]
  if missing:
    raise BarError(f"router init: no calibration tokens for experts {missing}; give every expert's capability (and "
                   "general data for the anchor) a share of the router sample")
  return (1.0 / (n_classes * counts))[labels]


def _one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
  y = np.zeros((len(labels), n_classes))
  y[np.arange(len(labels)), labels] = 1.0
  return y


def embedding_columns(x: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
  """[N, D] inputs, [N] labels -> [D, E]: class means centred over the classes, with the direction of the mean
  input projected out (the router has no bias: along it, x . c_e would be a per-column offset that grows with the
  large common component hidden states carry, not a domain signal), each column of unit length."""
  x = np.asarray(x, np.float64)
  _class_weights(labels, n_classes)  # the one-line refusal for an empty class
  means = np.stack([x[labels == e].mean(0) for e in range(n_classes)])
  centre = means.mean(0)
  cols = means - centre
  unit = centre / max(float(np.linalg.norm(centre)), 1e-12)
  cols -= np.outer(cols @ unit, unit)
  cols /= np.maximum(np.linalg.norm(cols, axis=1, keepdims=True), 1e-12)
  return cols.T


def ridge_columns(x: np.ndarray, labels: np.ndarray, n_classes: int, ridge: float = 1e-2,
                  targets: np.ndarray | None = None) -> np.ndarray:
  """[N, D] inputs, [N] labels -> [D, E]: class-balanced ridge regression onto the one-hot labels (or onto
  `targets` [N, E], the class weights still from `labels`). `ridge` is relative to the mean eigenvalue of the
  weighted Gram matrix, so it means the same at any activation scale."""
  x = np.asarray(x, np.float64)
  w = _class_weights(labels, n_classes)
  gram = (x * w[:, None]).T @ x
  if targets is None:
    targets = _one_hot(labels, n_classes)
  cross = (x * w[:, None]).T @ targets
  lam = ridge * np.trace(gram) / gram.shape[0]
  return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), cross)


def pair_targets(labels: np.ndarray, n_classes: int) -> np.ndarray:
  """[N] labels -> [N, E] regression targets of `pair`: 1 at the anchor (0) and at the token's own expert."""
  y = _one_hot(labels, n_classes)
  y[:, 0] = 1.0
  return y


def branch_split(logits: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
  """[N, E] merged-router logits -> [N, E] soft targets: a domain-d token split between the anchor and expert d
  as branch d's router (the merge's columns 0 and d) splits it, nothing to the others; a general token all anchor."""
  z = np.asarray(logits, np.float64)
  n = np.arange(len(z))
  zd, z0 = z[n, labels], z[:, 0]
  g = np.where(labels > 0, 1.0 / (1.0 + np.exp(np.clip(z0 - zd, -60, 60))), 0.0)
  q = np.zeros((len(z), n_classes))
  q[:, 0] = 1.0 - g
  q[n, labels] += g
  return q


def split_columns(x: np.ndarray, labels: np.ndarray, n_classes: int, kernel: np.ndarray, ridge: float = 1e-2,
                  max_iter: int = 500) -> tuple[np.ndarray, dict[str, float]]:
  """[N, D] inputs, [N] labels, the merge's [D, E] kernel -> the [D, E] kernel K minimising
  sum_i w_i CE(q_i, softmax(x_i K)) + lam / 2 ||K||^2, q = branch_split(x @ kernel) (each domain's token split
  as its branch split it, nothing to the other experts), w the class weights, lam = ridge x the mean eigenvalue
  of the weighted Gram matrix (as in ridge_columns). Convex: L-BFGS from the merge's kernel."""
  from scipy import optimize
  x = np.asarray(x, np.float64)
  w = _class_weights(labels, n_classes)
  k0 = np.asarray(kernel, np.float64)
  q = branch_split(x @ k0, labels, n_classes)
  lam = ridge * float(np.sum(w * np.einsum("nd,nd->n", x, x))) / x.shape[1]
  shape = k0.shape

  def loss_and_grad(flat):
    k = flat.reshape(shape)
    z = x @ k
    zmax = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(-1)) + zmax[:, 0]
    p = np.exp(z - lse[:, None])
    loss = float(np.sum(w * (lse - (q * z).sum(-1)))) + 0.5 * lam * float(np.sum(k * k))
    grad = x.T @ (w[:, None] * (p - q)) + lam * k
    return loss, grad.ravel()

  res = optimize.minimize(loss_and_grad, k0.ravel(), jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "gtol": 1e-9, "ftol": 1e-12})
  k = res.x.reshape(shape)
  p = _softmax(x @ k)
  n = np.arange(len(x))
  dom = labels > 0
  kept = p[:, 0] + np.where(dom, p[n, labels], 0.0)
  g_fit = p[n, labels] / np.maximum(p[n, labels] + p[:, 0], 1e-30)
  top = np.argmax(p, -1)
  return k.astype(np.float32), {
      "iterations": int(res.nit), "converged": bool(res.success),
      "train_top1_accuracy": round(float(np.mean((top == labels) | (top == 0))), 4),
      "leak": round(float(np.mean(1.0 - kept[dom])) if dom.any() else 0.0, 5),  # weight off {anchor, own}
      "split_error": round(float(np.mean(np.abs(g_fit - q[n, labels])[dom])) if dom.any() else 0.0, 5)}


def _softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def fit_scale(logits: np.ndarray, labels: np.ndarray, n_classes: int, *, max_logit: float = 30.0,
              offset: np.ndarray | None = None, targets: np.ndarray | None = None) -> float:
  """The s >= 0 minimising the class-balanced cross-entropy of softmax(offset + s * logits) against `targets`
  ([N, E] distributions; default the one-hot labels; offset default 0); s is capped so no row's spread of
  s * logits exceeds max_logit (separable data would otherwise send s to infinity). Convex in s: Newton."""
  z = np.asarray(logits, np.float64)
  w = _class_weights(labels, n_classes)
  if targets is None:
    targets = _one_hot(labels, n_classes)
  base = np.zeros_like(z) if offset is None else np.asarray(offset, np.float64)
  zq = (targets * z).sum(-1)
  spread = float(np.max(z.max(-1) - z.min(-1))) if len(z) else 0.0
  s_max = max_logit / spread if spread > 0 else 1.0
  s = min(1.0, s_max)
  for _ in range(50):  # Newton on a convex 1-D function, kept inside [0, s_max]
    p = _softmax(base + s * z)
    mean = (p * z).sum(-1)
    grad = float(np.sum(w * (mean - zq)))
    hess = float(np.sum(w * ((p * z * z).sum(-1) - mean ** 2)))
    step = grad / hess if hess > 1e-12 else -s_max
    s_new = float(np.clip(s - step, 0.0, s_max))
    if abs(s_new - s) <= 1e-6 * max(s, 1e-6):
      s = s_new
      break
    s = s_new
  return s


def fit_layer(x: np.ndarray, labels: np.ndarray, n_classes: int, method: str, ridge: float = 1e-2,
              max_logit: float = 30.0, kernel: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
  """One layer's router kernel [D, E] from its inputs and labels, and what the fit found (scale, train accuracy:
  the share of tokens whose largest weight is their own expert, for pair their anchor or own expert). `kernel`
  (the merge's [D, E]) is what `pair` adds to."""
  x = np.asarray(x, np.float64)
  if method in ("pair", "split") and kernel is None:
    raise BarError(f"router init {method}: needs the merge's router kernel (its branches' splits)")
  if method == "split":
    return split_columns(x, labels, n_classes, kernel, ridge)
  if method == "pair":
    base_k = np.asarray(kernel, np.float64)
    cols = ridge_columns(x, labels, n_classes, ridge, targets=pair_targets(labels, n_classes))
    offset, z = x @ base_k, x @ cols
    q = branch_split(offset, labels, n_classes)
    s = fit_scale(z, labels, n_classes, max_logit=max_logit, offset=offset, targets=q)
    top = np.argmax(offset + s * z, -1)
    acc = float(np.mean((top == labels) | (top == 0)))
    return (base_k + s * cols).astype(np.float32), {"scale": round(s, 6), "train_top1_accuracy": round(acc, 4)}
  if method == "embed":
    cols = embedding_columns(x, labels, n_classes)
  elif method == "ridge":
    cols = ridge_columns(x, labels, n_classes, ridge)
  else:
    raise BarError(f"unknown router init {method!r}: use one of {METHODS}")
  z = x @ cols
  s = fit_scale(z, labels, n_classes, max_logit=max_logit)
  acc = float(np.mean(np.argmax(z, -1) == labels))
  return (s * cols).astype(np.float32), {"scale": round(s, 6), "train_top1_accuracy": round(acc, 4)}


def fit(params: Any, cfg: ModelConfig, batches: Sequence[dict[str, np.ndarray]], method: str, *,
        ridge: float = 1e-2, max_logit: float = 30.0, compute: Compute = Compute()) -> tuple[Any, list[dict]]:
  """Every layer's router fitted in one layer-by-layer pass over `batches` ({inputs, positions, segment_ids [B, T],
  labels [B, T] int expert index, mask [B, T] 1 = a calibration token}). Returns (params with the new router
  kernels, per-layer fit records). `merged` returns params unchanged."""
  if method == "merged":
    return params, []
  if method not in METHODS:
    raise BarError(f"unknown router init {method!r}: use one of {METHODS}")
  if cfg.ffn != "moe":
    raise BarError("router init needs an MoE model: pass the merge stage's output")
  labels = np.concatenate([np.asarray(b["labels"])[np.asarray(b["mask"], bool)] for b in batches])
  if labels.size and (labels.min() < 0 or labels.max() >= cfg.n_experts):
    raise BarError(f"router init: labels outside 0..{cfg.n_experts - 1}; label each token with its expert's index")
  return _each_layer(params, cfg, batches, lambda x, kernel: fit_layer(x, labels, cfg.n_experts, method, ridge,
                                                                      max_logit, kernel=kernel), compute)


def _each_layer(params: Any, cfg: ModelConfig, batches: Sequence[dict[str, np.ndarray]], fit_one,
                compute: Compute) -> tuple[Any, list[dict]]:
  """One layer-by-layer pass (`transformer.layerwise`): fit_one(the layer's masked inputs [N, D], its kernel) ->
  (new kernel, record). Returns (params with the new kernels, the per-layer records)."""
  keep = [np.asarray(b["mask"], bool) for b in batches]
  records: list[dict] = []

  def visit(layer, inputs, kernel):
    new, rec = fit_one(np.concatenate([h[m] for h, m in zip(inputs, keep)]), kernel)
    records.append({"layer": layer, **rec})
    return new

  out = transformer.layerwise(params, [{k: b[k] for k in ("inputs", "positions", "segment_ids")} for b in batches],
                              cfg, visit, compute=compute)
  return out, records


def expert_share_columns(x: np.ndarray, kernel: np.ndarray, share: float, ridge: float = 1e-2
                         ) -> tuple[np.ndarray, dict[str, float]]:
  """A branch layer's [D, 2] router kernel with the expert's column moved by k * w so that the expert's mean weight
  on the inputs x [N, D] is `share`: w is the ridge regression of the constant 1 on x (x . w ~ 1 on every token: the
  bias the router lacks, carried by the component every hidden state shares), k the scalar found by bisection."""
  if not 0.5 <= share < 1.0:
    raise BarError(f"router_expert_share={share} must be in [0.5, 1): the expert's mean weight at the branch's start")
  x = np.asarray(x, np.float64)
  k0 = np.asarray(kernel, np.float64)
  n = len(x)  # one class, every token's target 1: the ridge fit of the constant
  w = ridge_columns(x, np.zeros(n, int), 1, ridge, targets=np.ones((n, 1)))[:, 0]
  base, proj = x @ (k0[:, 1] - k0[:, 0]), x @ w
  shares = lambda k: 1.0 / (1.0 + np.exp(-np.clip(base + k * proj, -60, 60)))  # noqa: E731
  lo, hi = 0.0, 64.0
  if shares(hi).mean() < share:
    raise BarError(f"router_expert_share={share}: the layer's inputs reach only {shares(hi).mean():.3f} (too few "
                   "tokens share a direction); lower the share or use router_init=random")
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if shares(mid).mean() < share else (lo, mid)
  k = 0.5 * (lo + hi)
  out = k0.copy()
  out[:, 1] += k * w
  return out.astype(np.float32), {"offset": round(k, 6), "share": round(float(shares(k).mean()), 4),
                                  "min_share": round(float(shares(k).min()), 4)}


def expert_share(params: Any, cfg: ModelConfig, batches: Sequence[dict[str, np.ndarray]], share: float, *,
                 ridge: float = 1e-2, compute: Compute = Compute()) -> tuple[Any, list[dict]]:
  """A fresh 2-expert branch's router set layer by layer (`expert_share_columns`) so its domain expert starts with
  `share` of the weight on the branch's own data ({inputs, positions, segment_ids, mask [B, T]}). Why: an expert
  trained at weight p learns an update sized for p; the merged router that sends a domain's tokens to its own
  expert (ridge) then applies it at ~1/p of that, unless the branch already trained it near 1. Exact at the start:
  both experts are the same function, so the branch still computes the base."""
  if cfg.ffn != "moe" or cfg.n_experts != 2:
    raise BarError("router_init=expert_share: needs a fresh 2-expert branch (upcycle's output)")
  return _each_layer(params, cfg, batches, lambda x, kernel: expert_share_columns(x, kernel, share, ridge), compute)
