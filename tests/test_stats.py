"""Intervals and paired tests against independent references: scipy's exact binomial test and Wilson interval,
normal-theory intervals on large samples, and the p-values the evaluation audit quoted for the committed results."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from bar_jax.evals import stats


@pytest.mark.parametrize("k,n", [(0, 16), (3, 8), (7, 8), (8, 8), (9, 16), (57, 200), (200, 200)])
def test_wilson_matches_scipy(k, n):
  ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
  lo, hi = stats.wilson(k, n)
  # Same closed form in float64: agreement to ~1e-12 of a percent.
  assert lo == pytest.approx(100 * ref.low, abs=1e-9) and hi == pytest.approx(100 * ref.high, abs=1e-9)
  assert lo <= 100.0 * k / n <= hi
  assert all(math.isnan(x) for x in stats.wilson(0, 0))


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (0, 4), (1, 6), (5, 5), (2, 9), (13, 30)])
def test_mcnemar_exact_matches_scipy_binomial(a_only, b_only):
  both, neither = 5, 3
  a = [True] * both + [False] * neither + [True] * a_only + [False] * b_only
  b = [True] * both + [False] * neither + [False] * a_only + [True] * b_only
  res = stats.mcnemar_exact(a, b)
  assert (res["a_only"], res["b_only"], res["n"]) == (a_only, b_only, len(a))
  ref = 1.0 if a_only + b_only == 0 else sps.binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue
  assert res["p"] == pytest.approx(ref, rel=1e-12)  # exact sums of binomial coefficients


def test_marginal_bound_reproduces_the_audit():
  """Scores alone bound the paired p from below: router refusals 3/8 -> 7/8 gives p >= 0.125; the tool-use upgrade
  7 -> 9 of 16 gives p >= 0.5; reaching p < 0.05 needs at least 6 items to change (2 * 2**-5 = 0.0625 for 5)."""
  assert stats.mcnemar_min_p(3, 7) == 0.125
  assert stats.mcnemar_min_p(7, 9) == 0.5
  assert stats.mcnemar_min_p(0, 5) > 0.05 > stats.mcnemar_min_p(0, 6)
  # The bound is attained by the most one-sided pairing, and no pairing beats it.
  a = [False] * 4 + [True] * 3 + [False] * 9
  b = [True] * 4 + [True] * 3 + [False] * 9
  assert stats.mcnemar_exact(a, b)["p"] == stats.mcnemar_min_p(3, 7)


def test_bootstrap_interval_matches_normal_theory_on_a_large_sample():
  x = np.random.default_rng(1).normal(3.0, 2.0, 2000)
  lo, hi = stats.bootstrap(x)
  half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
  # The bootstrap end points scatter by ~1/sqrt(50 tail samples) ~ 14% of the half width; 25% leaves room.
  assert lo == pytest.approx(x.mean() - half, abs=0.25 * half) and hi == pytest.approx(x.mean() + half, abs=0.25 * half)
  # Weighted: per-token NLL is sum(nll) / sum(tokens); the interval surrounds that ratio, not the item mean.
  tokens = np.array([1.0] * 10 + [100.0] * 40)
  nll_sums = np.array([9.0] * 10 + [100.0] * 40)
  lo, hi = stats.bootstrap(nll_sums / tokens, tokens)
  assert lo <= nll_sums.sum() / tokens.sum() <= hi < (nll_sums / tokens).mean()


def test_paired_bootstrap_sees_a_small_consistent_shift_that_unpaired_noise_hides():
  rng = np.random.default_rng(2)
  a = rng.normal(2.0, 1.0, 300)              # item difficulty varies a lot ...
  b = a - 0.05 + rng.normal(0, 0.02, 300)    # ... the change is small and consistent
  res = stats.paired_bootstrap(a, b)
  assert res["change"] == pytest.approx((b - a).mean(), rel=1e-12)
  half = 1.96 * (b - a).std(ddof=1) / math.sqrt(a.size)
  assert res["ci"][0] == pytest.approx(res["change"] - half, abs=0.25 * half)
  assert res["ci"][1] < 0 and stats.significant(res["p"])
  assert stats.bootstrap(a)[0] < b.mean()    # the unpaired interval of one model covers the other's mean
  same = stats.paired_bootstrap(a, a)
  assert same["change"] == 0 and same["p"] == 1.0
  noise = stats.paired_bootstrap(a, a + rng.normal(0, 1.0, 300))
  assert not stats.significant(noise["p"]) and noise["ci"][0] < 0 < noise["ci"][1]
  with pytest.raises(ValueError, match="same items"):
    stats.paired_bootstrap(a, b[:-1])


def test_retention_is_the_paired_ratio_and_flags_no_gain():
  rng = np.random.default_rng(0)
  base = (rng.random(400) < 0.1).astype(float)
  branch = np.maximum(base, rng.random(400) < 0.6)            # gains ~0.55
  moe = np.where(rng.random(400) < 0.9, branch, base)          # keeps ~90% of each item's gain
  r = stats.retention(base, branch, moe)
  assert r["defined"] and r["n"] == 400
  assert r["retention"] == pytest.approx((moe.mean() - base.mean()) / (branch.mean() - base.mean()))
  assert r["ci"][0] < r["retention"] < r["ci"][1] and 0.8 < r["retention"] < 1.0
  assert not stats.retention(base, base, moe)["defined"]      # no gain: the ratio is undefined


def test_tost_paired_decides_equivalence_at_the_margin():
  rng = np.random.default_rng(1)
  a = (rng.random(300) < 0.5).astype(float)
  same = a.copy()
  same[:6] = 1 - same[:6]                                      # 6 of 300 items flip: |change| <= 2 points
  t = stats.tost_paired(a, same, 0.05)
  assert t["equivalent"] and -0.05 < t["ci90"][0] <= t["change"] <= t["ci90"][1] < 0.05
  worse = np.where(rng.random(300) < 0.3, 0.0, a)              # ~15 points lower
  assert not stats.tost_paired(a, worse, 0.05)["equivalent"]
  assert not stats.tost_paired(a[:10], a[:10], 0.0)["equivalent"]  # a zero margin is never met
