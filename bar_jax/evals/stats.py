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


def bootstrap(values: Sequence[float], weights: Sequence[float] | None = None, *, n_boot: int = N_BOOT,
              seed: int = 0) -> tuple[float, float]:
  """Percentile interval (95%) of the mean of values (weights: a weighted mean, e.g. NLL per token with the item's
  token count as weight), resampling items with replacement."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)
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


def paired_bootstrap(a: Sequence[float], b: Sequence[float], weights_a: Sequence[float] | None = None,
                     weights_b: Sequence[float] | None = None, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
  """Change b - a of two (weighted) means over the same items, resampling items jointly.

  Returns {n, change, ci: (lo, hi), p}: p is two-sided, 2 * the share of resamples on the far side of 0
  (at least 1 / n_boot, the resolution of the bootstrap)."""
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


def tost_paired(a: Sequence[float], b: Sequence[float], margin: float, *, n_boot: int = N_BOOT,
                seed: int = 0) -> dict:
  """Two one-sided tests of |mean(b) - mean(a)| < margin on the same items (bootstrap): equivalent at level ALPHA
  when the paired (1 - 2 ALPHA) interval of the change lies inside (-margin, +margin). Returns {n, change,
  ci90, margin, p, equivalent}; p is the larger of the two one-sided bootstrap p values."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired test needs the same items: {a.shape} vs {b.shape}")
  if a.size == 0:
    return {"n": 0, "change": float("nan"), "ci90": (float("nan"), float("nan")), "margin": margin, "p": 1.0,
            "equivalent": False}
  idx = np.random.default_rng(seed).integers(0, a.size, (n_boot, a.size))
  diffs = b[idx].mean(-1) - a[idx].mean(-1)
  lo, hi = np.quantile(diffs, [ALPHA, 1 - ALPHA])
  p = max(float(np.mean(diffs <= -margin)), float(np.mean(diffs >= margin)), 1.0 / n_boot)
  return {"n": int(a.size), "change": float(b.mean() - a.mean()), "ci90": (float(lo), float(hi)), "margin": margin,
          "p": p, "equivalent": bool(-margin < lo and hi < margin)}
