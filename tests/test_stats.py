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


# ------------------------------------------------------------------------------------------------------------------
# Clusters, strata, Holm, the paired "overall".

def _loop_reference(a, b, wa, wb, strata, clusters, n_boot, seed):
  """The same resampling written item by item: per stratum (first-appearance order) draw its clusters (sorted by
  first appearance) with the same generator calls, concatenate their items, take weighted means, average strata."""
  rng = np.random.default_rng(seed)
  order = list(dict.fromkeys(strata))
  cl_code = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
  members = {s: [i for i in range(len(a)) if strata[i] == s] for s in order}
  draws_by_stratum = {}
  for s in order:
    ids = sorted({cl_code[clusters[i]] for i in members[s]})
    draws_by_stratum[s] = (ids, rng.integers(0, len(ids), (n_boot, len(ids))))
  out = []
  for r in range(n_boot):
    total = 0.0
    for s in order:
      ids, draws = draws_by_stratum[s]
      items = [i for d in draws[r] for i in members[s] if cl_code[clusters[i]] == ids[d]]
      total += (np.average([b[i] for i in items], weights=[wb[i] for i in items])
                - np.average([a[i] for i in items], weights=[wa[i] for i in items]))
    out.append(total / len(order))
  return np.asarray(out)


def test_cluster_and_stratum_resampling_match_an_item_by_item_reference():
  rng = np.random.default_rng(3)
  n = 40
  files = [f"f{i % 7}" for i in rng.permutation(n)]            # 7 clusters of uneven size, shuffled
  kinds = ["harmful" if int(f[1:]) < 3 else "benign" for f in files]  # clusters nested in strata
  a, b = rng.normal(2, 1, n), rng.normal(1.9, 1, n)
  wa, wb = rng.integers(5, 50, n).astype(float), rng.integers(5, 50, n).astype(float)
  change, draws = stats.paired_draws(a, b, wa, wb, strata=kinds, clusters=files, n_boot=200, seed=5)
  ref = _loop_reference(a, b, wa, wb, kinds, files, 200, 5)
  np.testing.assert_allclose(draws, ref, rtol=1e-12, atol=1e-12)
  by = lambda k, x, w: np.average([x[i] for i in range(n) if kinds[i] == k], weights=[w[i] for i in range(n)
                                                                                      if kinds[i] == k])
  assert change == pytest.approx(np.mean([by(k, b, wb) - by(k, a, wa) for k in ("harmful", "benign")]), rel=1e-12)
  with pytest.raises(ValueError, match="spans two strata"):
    stats.paired_draws(a, b, strata=["x"] * 20 + ["y"] * 20, clusters=["c"] * n)


def test_each_item_its_own_cluster_is_the_item_bootstrap():
  rng = np.random.default_rng(4)
  a, b = rng.normal(0, 1, 60), rng.normal(0.3, 1, 60)
  plain, clustered = stats.paired_bootstrap(a, b), stats.paired_bootstrap(a, b, clusters=list(range(60)))
  assert clustered["change"] == pytest.approx(plain["change"], rel=1e-12)
  np.testing.assert_allclose(clustered["ci"], plain["ci"], rtol=1e-10)
  assert clustered["p"] == plain["p"] and clustered["n_clusters"] == 60
  np.testing.assert_allclose(stats.bootstrap(b, clusters=list(range(60))), stats.bootstrap(b), rtol=1e-10)


def test_two_constant_clusters_give_the_hand_computed_interval():
  """20 items from 2 files, every item of file 1 scoring 0 and of file 2 scoring 1: a resample draws the files
  (0,0), (0,1), (1,0) or (1,1), so its mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4 and the 95% interval is
  [0, 1]. Resampling the 20 items as if independent gives about 0.5 +- 0.22."""
  v = np.array([0.0] * 10 + [1.0] * 10)
  files = ["a.py"] * 10 + ["b.py"] * 10
  assert stats.bootstrap(v, clusters=files) == (0.0, 1.0)
  _, draws = stats.paired_draws(np.zeros(20), v, clusters=files, n_boot=4000, seed=1)
  assert set(np.unique(draws)) == {0.0, 0.5, 1.0}
  assert np.mean(draws == 0.5) == pytest.approx(0.5, abs=0.03) and np.mean(draws == 0.0) == pytest.approx(0.25,
                                                                                                          abs=0.03)
  lo, hi = stats.bootstrap(v)
  assert 0.2 < lo < 0.35 and 0.65 < hi < 0.8
  # One file: resampling it shows no spread, so no interval, no significance and no equivalence (not a zero-width
  # interval with p = 1/n_boot, which the first tiny pipeline table marked significant).
  one = stats.paired_bootstrap(v, v + 0.1, clusters=["a.py"] * 20)
  assert one["change"] == pytest.approx(0.1) and all(math.isnan(x) for x in one["ci"]) and one["p"] == 1.0
  t = stats.tost_paired(v, v + 0.001, 0.05, clusters=["a.py"] * 20)
  assert not t["equivalent"] and t["p"] == 1.0
  assert all(math.isnan(x) for x in stats.bootstrap(v, clusters=["a.py"] * 20))


def test_holm_hand_computed_and_against_the_closed_testing_definition():
  # p sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06.
  assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
  assert stats.holm([0.02]) == [0.02]
  rng = np.random.default_rng(0)
  for _ in range(50):  # the step-down rule: reject the i-th smallest while p_(j) <= alpha / (m - j + 1) for all j <= i
    p = rng.random(5) * 0.1
    m, order, rejected = 5, np.argsort(p), set()
    for rank, i in enumerate(order):
      if p[i] > 0.05 / (m - rank):
        break
      rejected.add(int(i))
    assert {i for i, q in enumerate(stats.holm(p)) if q <= 0.05} == rejected


def test_weighted_tost_is_the_per_token_change():
  rng = np.random.default_rng(2)
  tokens = rng.integers(10, 200, 150).astype(float)
  a = rng.normal(2.0, 0.3, 150)
  b = a + 0.005 + rng.normal(0, 0.01, 150)              # 0.005 nats worse per token
  t = stats.tost_paired(a, b, 0.02, weights_a=tokens, weights_b=tokens)
  assert t["change"] == pytest.approx(np.average(b - a, weights=tokens), rel=1e-12)
  assert t["equivalent"] and t["p"] < 0.05
  far = stats.tost_paired(a, a + 0.03, 0.02, weights_a=tokens, weights_b=tokens)
  assert not far["equivalent"] and far["p"] == 1.0


def test_standardised_gain_against_a_loop_and_by_hand():
  rng = np.random.default_rng(6)
  rate_a = (rng.random(100) < 0.3).astype(float)
  rate_b = np.maximum(rate_a, rng.random(100) < 0.2)
  nll_a, tok = rng.normal(2.0, 0.5, 50), rng.integers(20, 80, 50).astype(float)
  nll_b = nll_a - 0.1
  doms = [dict(name="tool", a=rate_a, b=rate_b, scale=0.4, sign=1),
          dict(name="code", a=nll_a, b=nll_b, weights_a=tok, weights_b=tok, clusters=[i % 5 for i in range(50)],
               scale=0.5, sign=-1),
          dict(name="flat", a=np.zeros(10), b=np.zeros(10), scale=0.0, sign=1)]
  g = stats.standardised_gain(doms, n_boot=300, seed=2)
  by_hand = ((rate_b.mean() - rate_a.mean()) / 0.4 + 0.1 / 0.5 + 0.0) / 3
  assert g["gain"] == pytest.approx(by_hand, rel=1e-10) and g["constant"] == ["flat"]
  ref0 = _loop_reference(rate_a, rate_b, np.ones(100), np.ones(100), ["s"] * 100, list(range(100)), 300, 2)
  ref1 = _loop_reference(nll_a, nll_b, tok, tok, ["s"] * 50, [i % 5 for i in range(50)], 300, 3)
  expected = np.quantile((ref0 / 0.4 - ref1 / 0.5) / 3, [0.025, 0.975])
  np.testing.assert_allclose(g["ci"], expected, rtol=1e-10)
  assert g["ci"][0] > 0 and g["p"] < 0.05


def test_standardised_gain_p_is_the_sign_test_where_few_items_differ():
  """3 items gained, none lost, 37 unchanged: the paired permutation p is P(3 fair coins agree) = 2/8 = 0.25, the
  exact McNemar p (a bootstrap p would be near 0.05); with 12 gained it falls below 0.001 like McNemar's."""
  a = np.zeros(40)
  b = a.copy()
  b[:3] = 1.0
  g = stats.standardised_gain([dict(name="x", a=100 * a, b=100 * b, scale=20.0, sign=1)], n_boot=4000)
  assert g["p"] == pytest.approx(stats.mcnemar_exact(a > 0, b > 0)["p"], abs=0.03) and g["p"] == pytest.approx(0.25,
                                                                                                               abs=0.03)
  b[:12] = 1.0
  g = stats.standardised_gain([dict(name="x", a=100 * a, b=100 * b, scale=20.0, sign=1)], n_boot=4000)
  assert g["p"] < 0.001 and stats.mcnemar_exact(a > 0, b > 0)["p"] < 0.001
