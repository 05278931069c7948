"""Router columns from data (transforms/router_init.py) and the token-level routing diagnostics (evals/routing.py).

References: the ridge solution against numpy's least squares on the augmented system; the fitted scale against a
dense grid of the same objective; the diagnostics' mean weights against the scanned forward's own router means
(routing_stats, another code path); a tiny MoE whose domains are told apart by their tokens, where the fitted
router must send each domain to its own expert.
"""
import jax
import numpy as np
import pytest

from bar_jax.errors import BarError
from bar_jax.evals import routing
from bar_jax.model import transformer
from bar_jax.model.config import tiny
from bar_jax.transforms import router_init


def _two_domains(n=400, d=16, seed=0, separation=2.0):
  rng = np.random.default_rng(seed)
  mu = rng.standard_normal((3, d)) * separation
  labels = np.repeat(np.arange(3), [n // 2, n, n // 4])  # unbalanced on purpose: the fit balances the classes
  x = mu[labels] + rng.standard_normal((len(labels), d)) + 5.0  # a large common mean, as hidden states have
  return x, labels


def test_ridge_columns_equal_weighted_least_squares():
  x, y = _two_domains()
  ridge = 0.05
  cols = router_init.ridge_columns(x, y, 3, ridge)
  counts = np.bincount(y)
  w = 1.0 / (3 * counts[y])
  gram = (x * w[:, None]).T @ x
  lam = ridge * np.trace(gram) / x.shape[1]
  a = np.concatenate([x * np.sqrt(w)[:, None], np.sqrt(lam) * np.eye(x.shape[1])])
  target = np.concatenate([np.eye(3)[y] * np.sqrt(w)[:, None], np.zeros((x.shape[1], 3))])
  ref = np.linalg.lstsq(a, target, rcond=None)[0]
  # float64 normal equations vs a QR least squares: condition ~1e3 here, so ~1e-12 relative agreement
  np.testing.assert_allclose(cols, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["embed", "ridge"])
def test_init_columns_separate_synthetic_domains(method):
  x, y = _two_domains()
  kernel, rec = router_init.fit_layer(x, y, 3, method)
  acc = np.mean(np.argmax(x @ kernel, -1) == y)
  assert acc > 0.95 and rec["train_top1_accuracy"] > 0.95
  # Not vacuous: with the labels shuffled the same fit cannot separate anything.
  rng = np.random.default_rng(1)
  shuffled = rng.permutation(y)
  k2, _ = router_init.fit_layer(x, shuffled, 3, method)
  assert np.mean(np.argmax(x @ k2, -1) == shuffled) < 0.6


def test_fit_scale_minimises_the_balanced_cross_entropy():
  x, y = _two_domains(seed=3, separation=0.3)  # overlapping classes: the best scale is finite
  z = x @ router_init.ridge_columns(x, y, 3)
  s = router_init.fit_scale(z, y, 3, max_logit=1e6)
  w = 1.0 / (3 * np.bincount(y)[y])

  def ce(t):
    zz = t * z
    lse = np.log(np.exp(zz - zz.max(-1, keepdims=True)).sum(-1)) + zz.max(-1)
    return float(np.sum(w * (lse - zz[np.arange(len(y)), y])))
  grid = np.linspace(0.01, 3 * s, 3000)
  best = grid[np.argmin([ce(t) for t in grid])]
  assert abs(s - best) <= 2 * (grid[1] - grid[0])
  assert ce(s) <= min(ce(t) for t in grid) + 1e-9
  # The cap holds: no token's logit spread exceeds max_logit.
  capped = router_init.fit_scale(z, y, 3, max_logit=0.5)
  assert np.max(capped * (z.max(-1) - z.min(-1))) <= 0.5 + 1e-9


def _branch_kernel(d, n_classes, seed=5):
  """A stand-in for the merge's router: small random columns, as branch training leaves them."""
  return np.random.default_rng(seed).standard_normal((d, n_classes)) * 0.05


def test_pair_keeps_each_branch_split_and_mutes_the_other_experts():
  x, y = _two_domains(separation=3.0)
  k = _branch_kernel(x.shape[1], 3)
  new, rec = router_init.fit_layer(x, y, 3, "pair", kernel=k)
  p = router_init._softmax(x @ new)
  dom = y > 0
  n = np.arange(len(y))
  others = 1.0 - p[n, 0] - np.where(dom, p[n, y], 0.0)
  assert others[dom].mean() < 0.05 and p[~dom, 0].mean() > 0.9  # domain tokens stay in {anchor, own}
  z = x @ k
  g_branch = 1.0 / (1.0 + np.exp(z[n, 0] - z[n, y]))
  g_pair = p[n, y] / (p[n, y] + p[n, 0])
  # The branch's own split, kept up to the regression's residual on {anchor, own} (R_0 - R_d is ~0.1 on a
  # domain's tokens at this separation, times the fitted scale ~6: ~0.07 in probability; measured 0.074).
  assert np.mean(np.abs(g_pair - g_branch)[dom]) < 0.1
  # Not vacuous: the one-hot ridge router on the same data sends its tokens to the own expert far more sharply.
  ridge, _ = router_init.fit_layer(x, y, 3, "ridge")
  pr = router_init._softmax(x @ ridge)
  g_ridge = pr[n, y] / (pr[n, y] + pr[n, 0])
  assert np.mean(np.abs(g_ridge - g_branch)[dom]) > 0.2  # measured 0.255
  assert rec["train_top1_accuracy"] > 0.95


def test_pair_scale_minimises_the_soft_cross_entropy():
  x, y = _two_domains(seed=3, separation=0.5)
  k = _branch_kernel(x.shape[1], 3)
  base = x @ k
  z = x @ router_init.ridge_columns(x, y, 3, targets=router_init.pair_targets(y, 3))
  q = router_init.branch_split(base, y, 3)
  np.testing.assert_allclose(q.sum(-1), 1.0, rtol=0, atol=1e-12)
  s = router_init.fit_scale(z, y, 3, max_logit=1e6, offset=base, targets=q)
  w = 1.0 / (3 * np.bincount(y)[y])

  def ce(t):
    zz = base + t * z
    lse = np.log(np.exp(zz - zz.max(-1, keepdims=True)).sum(-1)) + zz.max(-1)
    return float(np.sum(w * (lse - (q * zz).sum(-1))))
  grid = np.linspace(0.01, 3 * s, 3000)
  assert abs(s - grid[np.argmin([ce(t) for t in grid])]) <= 2 * (grid[1] - grid[0])


def _many_domains(n_domains=8, n=300, d=24, seed=0, separation=3.0):
  rng = np.random.default_rng(seed)
  mu = rng.standard_normal((n_domains + 1, d)) * separation
  labels = np.repeat(np.arange(n_domains + 1), n)
  return mu[labels] + rng.standard_normal((len(labels), d)) + 5.0, labels


def test_split_keeps_each_branch_split_and_mutes_the_other_experts():
  x, y = _many_domains()
  e = 9
  k = _branch_kernel(x.shape[1], e)
  new, rec = router_init.split_columns(x, y, e, k, ridge=1e-3)
  assert rec["converged"]
  p = router_init._softmax(x @ new)
  n = np.arange(len(y))
  dom = y > 0
  others = 1.0 - p[n, 0] - np.where(dom, p[n, y], 0.0)
  assert np.isclose(rec["leak"], others[dom].mean(), atol=1e-5)
  assert others[dom].mean() < 0.03 and p[~dom, 0].mean() > 0.9  # measured 0.017, 0.98
  z = x @ k
  g_branch = 1.0 / (1.0 + np.exp(z[n, 0] - z[n, y]))
  g_split = p[n, y] / (p[n, y] + p[n, 0])
  # The branch's split up to what one linear column per expert can carry for 9 clusters (measured 0.079).
  assert np.mean(np.abs(g_split - g_branch)[dom]) < 0.1
  # Not vacuous: the one-hot ridge router on the same data puts almost all of each domain on its own expert.
  ridge, _ = router_init.fit_layer(x, y, e, "ridge")
  pr = router_init._softmax(x @ ridge)
  g_ridge = pr[n, y] / (pr[n, y] + pr[n, 0])
  assert np.mean(np.abs(g_ridge - g_branch)[dom]) > 0.2


def test_split_is_the_minimum_of_its_objective():
  x, y = _two_domains(seed=3, separation=0.5)  # overlapping: a finite, interior optimum
  k = _branch_kernel(x.shape[1], 3)
  ridge = 0.05
  new, _ = router_init.split_columns(x, y, 3, k, ridge)
  new = new.astype(np.float64)
  q = router_init.branch_split(x @ k, y, 3)
  w = 1.0 / (3 * np.bincount(y)[y])
  lam = ridge * np.sum(w * (x * x).sum(-1)) / x.shape[1]

  def objective(kk):
    zz = x @ kk
    lse = np.log(np.exp(zz - zz.max(-1, keepdims=True)).sum(-1)) + zz.max(-1)
    return float(np.sum(w * (lse - (q * zz).sum(-1)))) + 0.5 * lam * float(np.sum(kk * kk))
  f0 = objective(new)
  rng = np.random.default_rng(0)
  # Every random direction raises the objective (convex; the float32 kernel is ~1e-7 from the float64 optimum, so
  # a step of 1e-3 gains ~1e-6 x curvature, far above the rounding's first-order change).
  for _ in range(20):
    d = rng.standard_normal(new.shape)
    d *= 1e-3 / np.linalg.norm(d)
    assert objective(new + d) > f0 and objective(new - d) > f0


@pytest.mark.parametrize("method", ["pair", "split"])
def test_pair_and_split_need_the_merged_kernel(method):
  x, y = _two_domains()
  with pytest.raises(BarError, match="needs the merge's router kernel"):
    router_init.fit_layer(x, y, 3, method)


def test_an_empty_class_is_refused():
  x, y = _two_domains()
  with pytest.raises(BarError, match="no calibration tokens for experts \\[3\\]"):
    router_init.fit_layer(x, y, 4, "ridge")


# ----------------------------------------------------------------------------------------------------------------
# A tiny 3-expert MoE whose two domains use disjoint halves of the vocabulary.

def _tiny_moe(seed=0):
  cfg = tiny(vocab_size=256, max_seq_len=64).replace(ffn="moe", n_experts=3, expert_kind="ffn").validate()
  params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(seed)))
  return cfg, params


def _rows(seed, lo, hi, rows=4, T=32):
  rng = np.random.default_rng(seed)
  ids = rng.integers(lo, hi, (rows, T)).astype(np.int32)
  return {"inputs": ids, "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy(),
          "segment_ids": np.ones((rows, T), np.int32), "mask": np.ones((rows, T), np.int32)}


def _domains():
  return {"general": _rows(0, 0, 80), "math": _rows(1, 80, 160), "code": _rows(2, 160, 256)}


@pytest.mark.parametrize("method", ["embed", "ridge"])
def test_fitted_router_sends_each_domain_to_its_expert(method):
  cfg, params = _tiny_moe()
  names = ["general", "math", "code"]  # expert 0 (the anchor) takes general data
  rows = _domains()
  batches = [dict(r, labels=np.full(r["inputs"].shape, names.index(d), np.int32)) for d, r in rows.items()]
  before = routing.token_diagnostics(params, cfg, rows, names, taus=(1.0,))
  fitted, records = router_init.fit(params, cfg, batches, method)
  assert len(records) == cfg.n_layers and all(r["scale"] > 0 for r in records)
  after = routing.token_diagnostics(fitted, cfg, rows, names, taus=(1.0, 10.0))
  for d in names:
    assert before["own"]["1"][d]["weight"] < 0.45      # the random router: about uniform (1/3)
    assert after["own"]["1"][d]["rank"] == 1
    assert after["own"]["1"][d]["weight"] >= 0.5       # uniform is 1/3
    assert after["own"]["10"][d]["weight"] >= after["own"]["1"][d]["weight"]  # sharper: more to its own expert
  # Only the router changed.
  for path in ("embed", "final_norm"):
    np.testing.assert_array_equal(jax.tree.leaves(fitted[path]), jax.tree.leaves(params[path]))
  np.testing.assert_array_equal(fitted["layers"]["moe"]["experts"]["gate"], params["layers"]["moe"]["experts"]["gate"])
  # The contrast matrix: each domain's own column stands out on its tokens (layer mean).
  m = {d: np.mean(np.asarray(after["contrast"][d]), 0) for d in names}
  assert all(int(np.argmax(m[d])) == names.index(d) for d in names)


def test_token_diagnostics_match_the_scanned_forward():
  """At tau = 1 over every token, the layer-by-layer diagnostics see the weights routing_stats reads from the
  scanned forward's aux (a separate path: lax.scan, the jitted model, the router's own means)."""
  cfg, params = _tiny_moe(seed=4)
  rows = _domains()
  diag = routing.token_diagnostics(params, cfg, rows, ["general", "math", "code"], taus=(1.0,), batch_size=4)
  stats = routing.routing_stats(params, cfg, rows, batch_size=4)
  for d in rows:
    # fp32 forward of 2 layers, weights in [0, 1]: the two paths differ by op fusion only (~1e-6)
    np.testing.assert_allclose(np.asarray(diag["weights"]["1"][d]), np.asarray(stats["domains"][d]["mean_weight"]),
                               atol=2e-5)


def test_system_mask_drops_only_the_system_block():
  from bar_jax.io import models
  tok = models.load_model("tiny").tokenizer
  msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
  ids, _ = tok.render_chat(msgs)
  mask = routing.system_mask(tok, msgs, ids)
  user_start = tok.render_chat([{"role": "user", "content": "What is 2 + 2?"}])[0]
  n0 = len(mask) - sum(mask)
  assert tok.chat.get("default_system") is not None  # SmolLM2's template adds one
  assert n0 > 0 and tok.decode(ids[:n0]) == tok.decode(user_start[:n0])
  assert tok.decode(ids[n0:]).startswith("<|im_start|>user\nWhat is 2 + 2?")
  # A conversation's own system turn (tool use's function list) is domain content: nothing is masked.
  own = [{"role": "system", "content": "f(x) adds one"}] + msgs
  ids2, _ = tok.render_chat(own)
  assert routing.system_mask(tok, own, ids2) == [1] * len(ids2)


def test_replies_only_counts_exactly_the_assistant_tokens():
  from bar_jax.io import models
  tok = models.load_model("tiny").tokenizer
  convs = [[{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]
           for i in range(6)]
  rows = routing.conversation_rows(tok, convs, seq_len=32, max_rows=4, replies_only=True)
  # Reference: the rendered conversations laid end to end, cut to the packed slots; counted = the loss mask.
  ids = sum((tok.render_chat(c)[0] for c in convs), [])
  loss = sum((tok.render_chat(c)[1] for c in convs), [])
  n = rows["inputs"].size
  assert n > 0 and list(rows["inputs"].ravel()) == ids[:n]
  assert list(rows["mask"].ravel()) == loss[:n]
  counted = tok.decode([t for t, m in zip(ids[:n], loss[:n]) if m])
  assert "0" in counted and "<|im_end|>" in counted and "What" not in counted  # replies, never the prompts


def test_column_updates():
  rng = np.random.default_rng(0)
  init = rng.standard_normal((2, 8, 3))
  push = rng.standard_normal(8)
  kernel = init + np.stack([np.zeros(8), push, 2 * push], -1)[None]  # columns 1 and 2 moved along one direction
  u = routing.column_updates(kernel, init)
  assert u["l2"][0] == 0.0
  np.testing.assert_allclose(u["l2"][1:], [np.linalg.norm(push), 2 * np.linalg.norm(push)], rtol=1e-5)
  np.testing.assert_allclose(u["cosine"][1][2], 1.0, atol=1e-4)
  np.testing.assert_allclose(u["max_abs"][2], 2 * np.abs(push).max(), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The router stage with a closed-form init and no training steps, on the tiny artifacts (real data, real tokenizer).

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  from router_helpers import tiny_artifacts
  return tiny_artifacts(tmp_path_factory)


def test_router_stage_closed_form_init_routes_held_out_tokens(dirs, tmp_path):
  from bar_jax.io import artifact
  from bar_jax.stages import router as router_stage
  from bar_jax.transforms import upgrade as upgrade_lib
  from configs import router as router_config
  c = router_config.get_config("tiny")
  c.model = dirs["moe3"]
  c.router.update(init="ridge", epochs=0.0, init_rows=8, init_seq_len=256)
  out = str(tmp_path / "ridge")
  assert router_stage.run(c, out) == out
  src, new = artifact.read(dirs["moe3"]), artifact.read(out)
  changed = [p for p in src.manifest["leaf_fingerprints"]
             if src.manifest["leaf_fingerprints"][p] != new.manifest["leaf_fingerprints"][p]]
  assert changed == [upgrade_lib.ROUTER]
  rec, = new.manifest["stages"]
  assert rec["steps"] == 0 and rec["init"]["method"] == "ridge" and len(rec["init"]["layers"]) == new.cfg.n_layers
  assert rec["init"]["tokens"] > 0 and rec["flops"] > 0
  names = new.manifest["experts"]
  held_out = routing.domain_rows(src_tokenizer(dirs), ["math", "tool_use", "general"], seq_len=256, max_rows=8,
                                 mask_system=True)
  report = routing.token_diagnostics(new.params, new.cfg, held_out, ["general"] + names[1:], taus=(1.0,))
  before = routing.token_diagnostics(src.params, src.cfg, held_out, ["general"] + names[1:], taus=(1.0,))
  for d in ("math", "tool_use", "general"):  # the anchor's column was fitted to general data
    assert report["own"]["1"][d]["rank"] == 1, report["own"]
    assert report["own"]["1"][d]["weight"] > before["own"]["1"][d]["weight"] + 0.1


def src_tokenizer(dirs):
  from bar_jax.data.tokenizer import Tokenizer
  return Tokenizer.load(dirs["moe3"])


def test_own_share_leaves_the_anchor_out():
  # Two layers, experts [anchor, a, b]: domain a's own weight is small, but it gets most of the experts' weight.
  report = {"experts": ["general", "a", "b"], "weights": {"1": {"a": [[0.9, 0.08, 0.02], [0.7, 0.2, 0.1]],
                                                                "b": [[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]}}}
  got = routing.own_share(report, "1", "a")
  assert got == {"share": round(0.14 / 0.2, 4), "rank": 1}  # layer means [0.8, 0.14, 0.06]
  assert routing.own_share(report, "1", "b") == {"share": 0.4, "rank": 2}
  assert "0.70" in routing.format_diagnostics({**report, "tokens": {"a": 1, "b": 1}, "own": {"1": {
      "a": {"weight": 0.14, "rank": 2}, "b": {"weight": 0.2, "rank": 3}}}, "entropy": {"1": {"a": 0.5, "b": 0.9}}})


def test_expert_share_columns_reach_the_share_on_their_inputs():
  x, _ = _two_domains()
  kernel = np.random.default_rng(2).standard_normal((x.shape[1], 2)) * 0.02
  new, rec = router_init.expert_share_columns(x, kernel, 0.9)
  p = 1.0 / (1.0 + np.exp(-(x @ (new[:, 1] - new[:, 0]))))
  # bisection to ~1e-17 on the offset; the kernel is stored in float32 (relative 6e-8 on logits of ~2)
  np.testing.assert_allclose(p.mean(), 0.9, atol=1e-5)
  assert rec["min_share"] > 0.7  # x . w ~ 1 on every token, not a few tokens pushed to 1 and the rest left
  np.testing.assert_array_equal(new[:, 0], kernel[:, 0].astype(np.float32))  # the anchor's column is untouched
  with pytest.raises(BarError, match="router_expert_share=0.3"):
    router_init.expert_share_columns(x, kernel, 0.3)


@pytest.mark.parametrize("kind", ["lora", "ffn"])
def test_expert_share_branch_starts_at_the_share_and_still_computes_the_base(kind):
  """A fresh branch under expert_share: the scanned forward's own router means (routing_stats, another path than
  the layer-by-layer fit) give the expert the share on the calibration rows, and the logits are the dense base's
  (both experts are the same function, so the weights sum it back: fp32 rounding only)."""
  from bar_jax.transforms import upcycle
  cfg = tiny(vocab_size=256, max_seq_len=64).validate()
  base = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(5)))
  params, bcfg = upcycle.upcycle(base, cfg, expert_kind=kind, key=jax.random.key(0))
  rows = _rows(7, 0, 256, rows=6)
  batches = [{k: v[i:i + 1] for k, v in rows.items()} for i in range(6)]
  fitted, records = router_init.expert_share(params, bcfg, batches, 0.9)
  assert len(records) == bcfg.n_layers and all(abs(r["share"] - 0.9) < 1e-4 for r in records)
  stats = routing.routing_stats(fitted, bcfg, {"d": rows}, batch_size=6)
  before = routing.routing_stats(params, bcfg, {"d": rows}, batch_size=6)
  # fp32 forward vs the float64 fit on the same inputs: ~1e-6
  np.testing.assert_allclose(np.asarray(stats["domains"]["d"]["mean_weight"])[:, 1], 0.9, atol=1e-4)
  assert np.all(np.abs(np.asarray(before["domains"]["d"]["mean_weight"])[:, 1] - 0.5) < 0.1)  # not vacuous
  x = {k: rows[k] for k in ("inputs", "positions", "segment_ids")}
  dense = transformer.forward(base, x["inputs"], cfg, positions=x["positions"], segment_ids=x["segment_ids"])[0]
  moe = transformer.forward(fitted, x["inputs"], bcfg, positions=x["positions"], segment_ids=x["segment_ids"])[0]
  # logits of O(1) after 2 fp32 layers; w0 h + w1 h vs h differs by a few ulps per FFN
  np.testing.assert_allclose(np.asarray(moe), np.asarray(dense), atol=2e-5)
  for path in ("embed", "final_norm"):
    np.testing.assert_array_equal(jax.tree.leaves(fitted[path]), jax.tree.leaves(params[path]))
