"""Uncertainty of evaluation scores: 95% intervals for one model, paired tests for two models on the same items.

  wilson(k, n)                         interval of a rate (percent), exact enough at n = 16 and at 0 or n hits
  bootstrap(values[, weights])         interval of a mean (or of a token-weighted mean, e.g. per-token NLL)
  mcnemar_exact(a, b)                  paired rates: the exact two-sided binomial test on the discordant items
  paired_bootstrap(a, b[, weights])    paired means or NLL: interval of the change b - a and a two-sided p
  retention(base, branch, moe)         (moe - base) / (branch - base) over the same items, with a paired
                                       bootstrap interval: how much of a specialist's gain a merged model keeps
  tost_paired(a, b, margin)            equivalence of two models on the same items: both one-sided tests at
                                       alpha (the 90% paired interval of b - a inside +-margin)
  mcnemar_min_p(k_a, k_b)              the smallest exact McNemar p that marginal counts alone allow (for old
                                       reports that kept only scores: a change of d items has p >= 2 ** (1 - d))
  holm(pvalues)                        Holm's step-down adjustment (family-wise error across a claim's domains)
  standardised_gain(domains)           "overall" as a paired test: the mean over domains of each domain's change
                                       divided by a fixed per-domain scale, resampled within each domain

Resampling units. Every bootstrap here draws items with replacement, unless `clusters` is given: then whole
clusters are drawn (e.g. the code items' source files: 80 functions from 15 files are not 80 independent items), and
`strata` (e.g. safety's harmful / benign halves) are resampled separately, the statistic being the mean over strata
of each stratum's (weighted) mean. Without either, the draws are exactly the plain item bootstrap's.

Pure numpy/math, deterministic (the bootstrap draws from a fixed seed).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
N_BOOT = 2000             # resamples: the 2.5% tail holds 50 of them, so an end point moves by ~1/sqrt(50) of a tail
ALPHA = 0.05


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval of the rate k/n, in percent. (nan, nan) for n = 0."""
  if n <= 0:
    return float("nan"), float("nan")
  p = k / n
  denom = 1.0 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def _weighted_means(values: np.ndarray, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
  return (values[idx] * weights[idx]).sum(-1) / np.maximum(weights[idx].sum(-1), 1e-300)


def bootstrap(values: Sequence[float], weights: Sequence[float] | None = None, *, clusters: Sequence | None = None,
              strata: Sequence | None = None, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
  """Percentile interval (95%) of the mean of values (weights: a weighted mean, e.g. NLL per token with the item's
  token count as weight), resampling items with replacement (clusters / strata: see the module docstring)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)
  if clusters is not None or strata is not None:  # the change from a model scoring 0 everywhere: its mean
    _, draws = paired_draws(np.zeros_like(v), v, w, w, strata=strata, clusters=clusters, n_boot=n_boot, seed=seed)
    lo, hi = np.quantile(draws, [ALPHA / 2, 1 - ALPHA / 2])
    return float(lo), float(hi)
  idx = np.random.default_rng(seed).integers(0, v.size, (n_boot, v.size))
  stats = _weighted_means(v, w, idx)
  lo, hi = np.quantile(stats, [ALPHA / 2, 1 - ALPHA / 2])
  return float(lo), float(hi)


def _binom_two_sided_half(m: int, n: int) -> float:
  """min(1, 2 * P[X <= m]) for X ~ Binomial(n, 1/2): the exact two-sided test of a fair coin (symmetric)."""
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(m + 1)) / 2.0 ** n
  return min(1.0, 2.0 * tail)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
  """Exact McNemar test of two models' per-item successes on the same items (a[i], b[i] for item i).

  Returns {n, a_only (a right, b wrong), b_only, p}: p is two-sided; only discordant items carry information."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  if a.shape != b.shape:
    raise ValueError(f"paired test needs the same items: {a.shape} vs {b.shape}")
  a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
  return {"n": int(a.size), "a_only": a_only, "b_only": b_only,
          "p": _binom_two_sided_half(min(a_only, b_only), a_only + b_only)}


def mcnemar_min_p(k_a: int, k_b: int) -> float:
  """The smallest exact McNemar p any pairing of items allows when model A got k_a and B got k_b right: every
  discordant item in the direction of the change (|k_a - k_b| of them, none the other way)."""
  return _binom_two_sided_half(0, abs(k_a - k_b))


def _codes(labels: Sequence, n: int, what: str) -> np.ndarray:
  """Labels -> integer codes 0..k-1 in order of first appearance."""
  if len(labels) != n:
    raise ValueError(f"{what} needs one label per item: {len(labels)} labels for {n} items")
  seen: dict = {}
  return np.asarray([seen.setdefault(x, len(seen)) for x in labels], np.int64)


def resample_counts(n: int, *, strata: Sequence | None = None, clusters: Sequence | None = None,
                    n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
  """[n_boot, n] multiplicities of each item in each resample: within each stratum its clusters (items, when none
  are given) drawn with replacement, as many as it has. A cluster must lie within one stratum. With neither, the
  draws are the plain bootstrap's (rng.integers(0, n, (n_boot, n)))."""
  rng = np.random.default_rng(seed)
  stratum = np.zeros(n, np.int64) if strata is None else _codes(strata, n, "strata")
  cluster = np.arange(n) if clusters is None else _codes(clusters, n, "clusters")
  counts = np.zeros((n_boot, n))
  for s in range(int(stratum.max()) + 1 if n else 0):
    members = np.flatnonzero(stratum == s)
    ids = np.unique(cluster[members])  # this stratum's clusters
    if len(set(stratum[np.isin(cluster, ids)])) > 1:
      raise ValueError("a cluster spans two strata: give each cluster's items one stratum")
    draws = rng.integers(0, ids.size, (n_boot, ids.size))
    per_cluster = np.zeros((n_boot, ids.size))
    np.add.at(per_cluster, (np.arange(n_boot)[:, None], draws), 1.0)
    pos = np.searchsorted(ids, cluster[members])
    counts[:, members] = per_cluster[:, pos]
  return counts


def _stratified_means(v: np.ndarray, w: np.ndarray, counts: np.ndarray, stratum: np.ndarray) -> np.ndarray:
  """Per resample (rows of counts): the mean over strata of each stratum's weighted mean."""
  out = np.zeros(counts.shape[0])
  k = int(stratum.max()) + 1
  for s in range(k):
    m = stratum == s
    cw = counts[:, m] * w[m]
    out += (cw * v[m]).sum(-1) / np.maximum(cw.sum(-1), 1e-300)
  return out / k


def paired_draws(a: Sequence[float], b: Sequence[float], weights_a: Sequence[float] | None = None,
                 weights_b: Sequence[float] | None = None, *, strata: Sequence | None = None,
                 clusters: Sequence | None = None, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, np.ndarray]:
  """(change b - a on the items, [n_boot] resampled changes): items, clusters and strata as the module docstring
  says; the change is the mean over strata of each stratum's weighted-mean change."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired test needs the same items: {a.shape} vs {b.shape}")
  wa = np.ones_like(a) if weights_a is None else np.asarray(weights_a, np.float64)
  wb = np.ones_like(b) if weights_b is None else np.asarray(weights_b, np.float64)
  if a.size == 0:
    return float("nan"), np.full(n_boot, np.nan)
  stratum = np.zeros(a.size, np.int64) if strata is None else _codes(strata, a.size, "strata")
  ones = np.ones((1, a.size))
  change = float(_stratified_means(b, wb, ones, stratum)[0] - _stratified_means(a, wa, ones, stratum)[0])
  cluster = np.arange(a.size) if clusters is None else _codes(clusters, a.size, "clusters")
  if any(len(set(stratum[cluster == c])) > 1 for c in np.unique(cluster)):
    raise ValueError("a cluster spans two strata: give each cluster's items one stratum")
  if min(len(set(cluster[stratum == s])) for s in range(int(stratum.max()) + 1)) < 2:
    # a stratum of one resampling unit (e.g. all code items from one file): resampling cannot see any spread
    return change, np.full(n_boot, np.nan)
  counts = resample_counts(a.size, strata=strata, clusters=clusters, n_boot=n_boot, seed=seed)
  return change, _stratified_means(b, wb, counts, stratum) - _stratified_means(a, wa, counts, stratum)


def _two_sided_p(diffs: np.ndarray, n_boot: int) -> float:
  if np.all(diffs == 0) or np.isnan(diffs).any():  # no change, or no resampling possible: no evidence
    return 1.0
  return float(min(1.0, max(1.0 / n_boot, 2.0 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], weights_a: Sequence[float] | None = None,
                     weights_b: Sequence[float] | None = None, *, strata: Sequence | None = None,
                     clusters: Sequence | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict:
  """Change b - a of two (weighted) means over the same items, resampling items (or clusters, within strata:
  the module docstring) jointly.

  Returns {n, change, ci: (lo, hi), p}: p is two-sided, 2 * the share of resamples on the far side of 0
  (at least 1 / n_boot, the resolution of the bootstrap); n_clusters when clusters are given."""
  if strata is not None or clusters is not None:
    change, diffs = paired_draws(a, b, weights_a, weights_b, strata=strata, clusters=clusters, n_boot=n_boot,
                                 seed=seed)
    if np.asarray(a).size == 0:
      return {"n": 0, "change": float("nan"), "ci": (float("nan"), float("nan")), "p": 1.0}
    lo, hi = np.quantile(diffs, [ALPHA / 2, 1 - ALPHA / 2])
    out = {"n": int(np.asarray(a).size), "change": change, "ci": (float(lo), float(hi)),
           "p": _two_sided_p(diffs, n_boot)}
    if clusters is not None:
      out["n_clusters"] = len(set(clusters))
    return out
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired test needs the same items: {a.shape} vs {b.shape}")
  wa = np.ones_like(a) if weights_a is None else np.asarray(weights_a, np.float64)
  wb = np.ones_like(b) if weights_b is None else np.asarray(weights_b, np.float64)
  full = np.arange(a.size)[None]
  change = float(_weighted_means(b, wb, full)[0] - _weighted_means(a, wa, full)[0])
  if a.size == 0:
    return {"n": 0, "change": float("nan"), "ci": (float("nan"), float("nan")), "p": 1.0}
  idx = np.random.default_rng(seed).integers(0, a.size, (n_boot, a.size))
  diffs = _weighted_means(b, wb, idx) - _weighted_means(a, wa, idx)
  lo, hi = np.quantile(diffs, [ALPHA / 2, 1 - ALPHA / 2])
  if np.all(diffs == 0):
    p = 1.0
  else:
    p = min(1.0, max(1.0 / n_boot, 2.0 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))))
  return {"n": int(a.size), "change": change, "ci": (float(lo), float(hi)), "p": float(p)}


def significant(p: float) -> bool:
  return p < ALPHA


def retention(base: Sequence[float], branch: Sequence[float], moe: Sequence[float], *, n_boot: int = N_BOOT,
              seed: int = 0) -> dict:
  """(mean(moe) - mean(base)) / (mean(branch) - mean(base)) on the same items, resampled jointly (paired). The
  ratio is undefined where the branch gained nothing: `defined` is False when the gain's own 95% interval touches
  0 (then the interval of the ratio means nothing). Returns {n, gain, kept, retention, ci, defined}."""
  a, s, m = (np.asarray(x, np.float64) for x in (base, branch, moe))
  if not a.shape == s.shape == m.shape:
    raise ValueError(f"retention needs the same items: {a.shape}, {s.shape}, {m.shape}")
  if a.size == 0:
    return {"n": 0, "gain": float("nan"), "kept": float("nan"), "retention": float("nan"),
            "ci": (float("nan"), float("nan")), "defined": False}
  idx = np.random.default_rng(seed).integers(0, a.size, (n_boot, a.size))
  gains = s[idx].mean(-1) - a[idx].mean(-1)
  kept = m[idx].mean(-1) - a[idx].mean(-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    ratios = np.where(gains != 0, kept / gains, np.nan)
  gain, kept_full = float(s.mean() - a.mean()), float(m.mean() - a.mean())
  g_lo, _ = np.quantile(gains, [ALPHA / 2, 1 - ALPHA / 2])
  defined = bool(g_lo > 0)
  lo, hi = np.nanquantile(ratios, [ALPHA / 2, 1 - ALPHA / 2]) if np.isfinite(ratios).any() else (np.nan, np.nan)
  return {"n": int(a.size), "gain": gain, "kept": kept_full, "retention": kept_full / gain if gain else float("nan"),
          "ci": (float(lo), float(hi)), "defined": defined}


def tost_paired(a: Sequence[float], b: Sequence[float], margin: float, *, weights_a: Sequence[float] | None = None,
                weights_b: Sequence[float] | None = None, strata: Sequence | None = None,
                clusters: Sequence | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict:
  """Two one-sided tests of |mean(b) - mean(a)| < margin on the same items (bootstrap; weights, strata and
  clusters as paired_bootstrap): equivalent at level ALPHA when the paired (1 - 2 ALPHA) interval of the change lies
  inside (-margin, +margin). Returns {n, change, ci90, margin, p, equivalent}; p is the larger of the two one-sided
  bootstrap p values (at least 1 / n_boot), the p that a multiplicity correction (holm) adjusts."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired test needs the same items: {a.shape} vs {b.shape}")
  if a.size == 0:
    return {"n": 0, "change": float("nan"), "ci90": (float("nan"), float("nan")), "margin": margin, "p": 1.0,
            "equivalent": False}
  if weights_a is None and weights_b is None and strata is None and clusters is None:
    idx = np.random.default_rng(seed).integers(0, a.size, (n_boot, a.size))
    diffs = b[idx].mean(-1) - a[idx].mean(-1)
    change = float(b.mean() - a.mean())
  else:
    change, diffs = paired_draws(a, b, weights_a, weights_b, strata=strata, clusters=clusters, n_boot=n_boot,
                                 seed=seed)
  if np.isnan(diffs).any():  # one resampling unit: nothing shows equivalence
    return {"n": int(a.size), "change": change, "ci90": (float("nan"), float("nan")), "margin": margin, "p": 1.0,
            "equivalent": False}
  lo, hi = np.quantile(diffs, [ALPHA, 1 - ALPHA])
  p = max(float(np.mean(diffs <= -margin)), float(np.mean(diffs >= margin)), 1.0 / n_boot)
  return {"n": int(a.size), "change": change, "ci90": (float(lo), float(hi)), "margin": margin,
          "p": p, "equivalent": bool(-margin < lo and hi < margin)}


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p values, in the order given: the i-th smallest p times (m - i + 1), made monotone
  and capped at 1. Rejecting where the adjusted p < ALPHA controls the family-wise error at ALPHA across the m
  tests (a claim's domains)."""
  p = np.asarray(pvalues, np.float64)
  m = p.size
  order = np.argsort(p, kind="stable")
  adjusted = np.empty(m)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adjusted[i] = running
  return [float(x) for x in adjusted]


def _flipped_changes(a, b, weights_a, weights_b, *, strata, clusters, n_perm: int,
                     rng: np.random.Generator) -> np.ndarray:
  """[n_perm] changes b - a after swapping the two models' outcomes on a random half of the items (whole clusters
  swapped together): the paired permutation (sign-flip) distribution of the change under "no difference"."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  wa = np.ones_like(a) if weights_a is None else np.asarray(weights_a, np.float64)
  wb = np.ones_like(b) if weights_b is None else np.asarray(weights_b, np.float64)
  cluster = np.arange(a.size) if clusters is None else _codes(clusters, a.size, "clusters")
  stratum = np.zeros(a.size, np.int64) if strata is None else _codes(strata, a.size, "strata")
  flip = (rng.random((n_perm, int(cluster.max()) + 1)) < 0.5)[:, cluster]
  aa, bb = np.where(flip, b, a), np.where(flip, a, b)
  waa, wbb = np.where(flip, wb, wa), np.where(flip, wa, wb)
  out = np.zeros(n_perm)
  k = int(stratum.max()) + 1
  for s in range(k):
    m = stratum == s
    out += ((wbb[:, m] * bb[:, m]).sum(-1) / np.maximum(wbb[:, m].sum(-1), 1e-300)
            - (waa[:, m] * aa[:, m]).sum(-1) / np.maximum(waa[:, m].sum(-1), 1e-300))
  return out / k


def standardised_gain(domains: Sequence[dict], *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
  """"Overall" as one paired statistic: the mean over domains of (sign * change / scale). Its interval: each
  domain's change resampled within that domain (its own strata and clusters: a bootstrap stratified by domain). Its
  p: a paired permutation test (each item's, or cluster's, two outcomes swapped at random, n_boot times), which
  stays exact-like where few items differ (a bootstrap p there is too small: 3 items gained and none lost give a
  bootstrap p near 0.05 against the sign test's 0.25).

  domains: [{name, a, b, weights_a?, weights_b?, strata?, clusters?, scale, sign}], sign +1 where higher is better
  (-1 for NLL), scale a fixed positive number per domain (report.overall_paired: the standard deviation of the
  per-item outcomes of both models pooled), so a gain of one scale counts the same in every domain. A domain of
  scale 0 (both models constant and equal) contributes 0 and is named in `constant`. Returns {n_domains, gain,
  ci, p, per_domain: {name: standardised change}, constant}."""
  total, draws, perms, per, constant = 0.0, np.zeros(n_boot), np.zeros(n_boot), {}, []
  perm_rng = np.random.default_rng(seed + 10_000)
  for k, d in enumerate(domains):
    change, ds = paired_draws(d["a"], d["b"], d.get("weights_a"), d.get("weights_b"), strata=d.get("strata"),
                              clusters=d.get("clusters"), n_boot=n_boot, seed=seed + k)
    flipped = _flipped_changes(d["a"], d["b"], d.get("weights_a"), d.get("weights_b"), strata=d.get("strata"),
                               clusters=d.get("clusters"), n_perm=n_boot, rng=perm_rng)
    scale = float(d["scale"])
    if not scale > 0:
      constant.append(d["name"])
      per[d["name"]] = 0.0
      continue
    per[d["name"]] = d["sign"] * change / scale
    total += per[d["name"]]
    draws += d["sign"] * ds / scale
    perms += d["sign"] * flipped / scale
  m = len(domains)
  if not m:
    return {"n_domains": 0, "gain": float("nan"), "ci": (float("nan"), float("nan")), "p": 1.0, "per_domain": {},
            "constant": []}
  draws, perms, gain = draws / m, perms / m, total / m
  lo, hi = np.quantile(draws, [ALPHA / 2, 1 - ALPHA / 2])
  p = (1 + int(np.sum(np.abs(perms) >= abs(gain) - 1e-12))) / (1 + n_boot)
  return {"n_domains": m, "gain": gain, "ci": (float(lo), float(hi)), "p": float(p), "test": "paired permutation",
          "per_domain": per, "constant": constant}
