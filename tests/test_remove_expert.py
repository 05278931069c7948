"""Removing an expert, slicing experts out of a merged MoE, and the oracle model: the pure transforms
(transforms/upgrade.remove, slice_experts) against independent references, and the upgrade stage's remove and oracle
modes on tiny artifacts (bit-identity of everything kept, lineage, one-line errors with nothing written)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bar_jax import pytree
from bar_jax.errors import BarError
from bar_jax.io import artifact
from bar_jax.model import moe, transformer
from bar_jax.model.config import tiny
from bar_jax.stages import upgrade as upgrade_stage
from bar_jax.transforms import merge as merge_lib
from bar_jax.transforms import upgrade as upgrade_lib
from bar_jax.transforms.upcycle import upcycle
from configs import upgrade as upgrade_config
from numerics import ulps
from router_helpers import tiny_artifacts

CFG = tiny(vocab_size=259)
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
ROUTER, GATE = upgrade_lib.ROUTER, "layers/moe/experts/gate"
forward = jax.jit(lambda p, t, cfg: transformer.forward(p, t, cfg)[0], static_argnums=2)


def trained_branch(base, kind, seed):
  """A branch as if trained: its domain expert (or adapter), its router column 1 and shared leaves moved off the base.
  The anchor FFN and the anchor column stay as upcycle made them (frozen in training); the anchor column is upcycle's
  random init from this branch's key, so it differs between branches (as between branches of different seeds)."""
  branch, cfg = upcycle(base, CFG, expert_kind=kind, lora_rank=4, key=jax.random.key(seed))
  branch = jax.tree.map(np.array, branch)  # copies: upcycle shares the base's arrays
  rng = np.random.default_rng(seed)
  noise = lambda x, s=0.1: (x + s * rng.standard_normal(x.shape)).astype(np.float32)  # noqa: E731
  m = branch["layers"]["moe"]
  if kind == "ffn":
    for w in m["experts"]:
      m["experts"][w][:, 1] = noise(m["experts"][w][:, 1])
  else:
    m["lora"] = {w: {"a": noise(ab["a"]), "b": noise(ab["b"])} for w, ab in m["lora"].items()}
  m["router"]["kernel"][..., 1] = noise(m["router"]["kernel"][..., 1], 0.3)
  branch["layers"]["attn"]["q"]["kernel"] = noise(branch["layers"]["attn"]["q"]["kernel"])
  branch["embed"]["embedding"] = noise(branch["embed"]["embedding"])
  return branch, cfg


@pytest.fixture(scope="module")
def merged():
  """{kind: (merged [anchor + 3 experts], its cfg, [(branch, cfg)] x 3)} for ffn and lora experts."""
  base = jax.tree.map(np.asarray, transformer.init_params(CFG, jax.random.key(0)))
  out = {}
  for kind in ("ffn", "lora"):
    branches = [trained_branch(base, kind, seed) for seed in (1, 2, 3)]
    params, cfg = merge_lib.merge(base, [b for b, _ in branches], [c for _, c in branches])
    out[kind] = (params, cfg, branches)
  return out


def expert_slice(flat, path, e):
  """Expert e's slice of an expert-stacked leaf, by hand: router column e, ffn slot e, LoRA adapter e - 1."""
  x = np.asarray(flat[path])
  return x[..., e] if path == ROUTER else x[:, e - 1] if path.startswith(upgrade_lib.LORA) else x[:, e]


# ----------------------------------------------------------------------------------------------------------------
# remove

@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_remove_keeps_every_other_leaf_and_slice(merged, kind):
  params, cfg, _ = merged[kind]
  before = pytree.flatten(params)
  out, new_cfg = upgrade_lib.remove(params, cfg, 2)
  after = pytree.flatten(out)
  assert new_cfg == cfg.replace(n_experts=3) and set(after) == set(before)
  keep = [0, 1, 3]  # new slot j holds old expert keep[j]
  for path, x in after.items():
    if not path.startswith("layers/moe/"):
      np.testing.assert_array_equal(x, before[path], err_msg=path)
      continue
    stacked = path == ROUTER or path.startswith(upgrade_lib.LORA) or kind == "ffn"
    if not stacked:  # LoRA: experts/ holds the anchor alone
      np.testing.assert_array_equal(x, before[path], err_msg=path)
      continue
    for new, old in enumerate(keep):
      if old == 0 and path.startswith(upgrade_lib.LORA):
        continue
      np.testing.assert_array_equal(expert_slice(after, path, new), expert_slice(before, path, old), err_msg=path)
    slots = x.shape[-1] if path == ROUTER else x.shape[1]
    assert slots == (2 if path.startswith(upgrade_lib.LORA) else 3), path
  # The same by fingerprints: the removed model's slices, named by their old index, are the input's.
  fp_before = upgrade_lib.expert_fingerprints(params, cfg)
  fp_after = upgrade_lib.expert_fingerprints(out, new_cfg, slots=keep)
  assert fp_after == {k: v for k, v in fp_before.items() if not k.endswith("[2]")}
  assert upgrade_lib.changed_experts(fp_before, fp_after, include_router=True) == [2]
  for bad, match in ((0, "cannot be removed.*0 is the frozen anchor"), (4, "cannot be removed: this MoE has "
                                                                           "experts 1..3")):
    with pytest.raises(BarError, match=match):
      upgrade_lib.remove(params, cfg, bad)
  two, two_cfg = upgrade_lib.remove(out, new_cfg, 1)
  assert two_cfg.n_experts == 2
  with pytest.raises(BarError, match="would leave only the anchor") as e:
    upgrade_lib.remove(two, two_cfg, 1)
  assert "\n" not in str(e.value)


def test_remove_clamps_top_k():
  cfg = tiny(vocab_size=259, ffn="moe", n_experts=5)
  params = {"layers/moe/router/kernel": np.zeros((1, 2, 5), np.float32),
            "layers/moe/experts/gate": np.zeros((1, 5, 2, 3), np.float32)}
  for top_k, norm, want in ((0, False, 0), (2, True, 2), (3, False, 3), (4, True, 0), (5, False, 0)):
    _, new = upgrade_lib.remove(params, cfg.replace(top_k=top_k, norm_topk=norm).validate(), 1)
    assert (new.n_experts, new.top_k, new.norm_topk) == (4, want, norm), top_k


def renormalised_reference(params, cfg, removed, new_cfg, monkeypatch):
  """The ORIGINAL MoE's forward with expert `removed`'s combine weight forced to zero and the others renormalised:
  every layer's router softmax p over all E experts (moe.route as the model computes it), p[removed] = 0,
  q = p / sum(p), then new_cfg's top-k and norm_topk on q. Removing the expert instead runs the softmax over E - 1
  logits: exp(l_j) / sum_{k != removed} exp(l_k) = q_j, the same function by another computation."""
  route = moe.route

  def masked(kernel, x, cfg_):
    _, _, logits = route(kernel, x, cfg_)
    p = jax.nn.softmax(logits, axis=-1).at[:, removed].set(0.0)
    q = p / jnp.sum(p, axis=-1, keepdims=True)
    k = new_cfg.k
    if k < new_cfg.n_experts:  # q[removed] = 0 < every other q: top-k never picks it
      top, idx = jax.lax.top_k(q, k)
      q = jnp.sum(jax.nn.one_hot(idx, cfg_.n_experts, dtype=q.dtype) * top[..., None], axis=-2)
    else:
      idx = jnp.broadcast_to(jnp.arange(cfg_.n_experts), q.shape)
    if new_cfg.norm_topk:
      q = q / jnp.sum(q, axis=-1, keepdims=True)
    return q, idx, logits

  with monkeypatch.context() as mp:
    mp.setattr(moe, "route", masked)
    return np.asarray(jax.jit(lambda p: transformer.forward(p, TOKENS, cfg)[0])(params))  # traced under the patch


@pytest.mark.parametrize("kind,top_k,norm", [("ffn", 0, False), ("lora", 2, True)])
def test_removed_model_is_the_renormalised_original(merged, monkeypatch, kind, top_k, norm):
  params, cfg, _ = merged[kind]
  cfg = cfg.replace(top_k=top_k, norm_topk=norm).validate()
  out, new_cfg = upgrade_lib.remove(params, cfg, 2)
  assert (new_cfg.top_k, new_cfg.norm_topk) == (top_k, norm)
  got = np.asarray(forward(out, TOKENS, new_cfg))
  want = renormalised_reference(params, cfg, 2, new_cfg, monkeypatch)
  # The two differ only by rounding: the combine weights by a few float32 ulps (a softmax over 3 logits vs one over
  # 4 divided by a sum of 3), the zero-weighted expert adds exact zeros (ffn), and the LoRA side path sums 2 vs 3
  # adapters in another blocking; through 2 layers and the LM head that stays within tens of ulps of the largest
  # logit (measured: under 8), so 64 ulps. The original model's logits move by far more (checked below).
  np.testing.assert_allclose(got, want, rtol=0, atol=ulps(want, 64))
  original = np.asarray(forward(params, TOKENS, cfg))
  assert np.max(np.abs(original - want)) > ulps(want, 10_000)  # removing expert 2 matters: the test can fail


# ----------------------------------------------------------------------------------------------------------------
# slice_experts: [anchor, expert d] of the merged MoE with branch d's router and shared leaves is branch d

@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_slice_reproduces_each_branch_bit_for_bit(merged, kind):
  params, cfg, branches = merged[kind]
  got_logits = {}
  for d, (branch, bcfg) in enumerate(branches, 1):
    out, scfg = upgrade_lib.slice_experts(params, cfg, [0, d], router=branch, shared=branch)
    assert scfg == bcfg
    # Every branch's anchor (ffn slot 0; LoRA: the stored FFN) is the base's FFN, frozen, so the merge's float64 mean
    # of N identical float32 values is N x / N = x exactly (N x needs log2(N) more bits than float32 has, far under
    # float64's 53) and rounds back to x bit for bit; expert d is branch d's slot 1 (adapter 0) copied. With branch
    # d's router and shared leaves the sliced tree is branch d's, leaf for leaf.
    want = pytree.flatten(branch)
    sliced = pytree.flatten(out)
    assert set(sliced) == set(want)
    for path, x in sliced.items():
      np.testing.assert_array_equal(x, want[path], err_msg=path)
    # Same parameters, same config: the same jitted program on the same device gives the same logits, bit for bit.
    got_logits[d] = np.asarray(forward(out, TOKENS, scfg))
    np.testing.assert_array_equal(got_logits[d], np.asarray(forward(branch, TOKENS, bcfg)))
  # The slot order matters: expert d' with branch d's router and shared leaves is not branch d.
  for d, (branch, bcfg) in enumerate(branches, 1):
    other = d % len(branches) + 1
    wrong, _ = upgrade_lib.slice_experts(params, cfg, [0, other], router=branch, shared=branch)
    assert not np.allclose(np.asarray(forward(wrong, TOKENS, bcfg)), got_logits[d], atol=1e-3), (d, other)
  # Without branch d's router: column 0 is the mean of the branches' (different) anchor columns, so not branch d's.
  branch, bcfg = branches[0]
  mean_col, _ = upgrade_lib.slice_experts(params, cfg, [0, 1], shared=branch)
  r = pytree.flatten(mean_col)[ROUTER]
  np.testing.assert_array_equal(r[..., 1], pytree.flatten(branch)[ROUTER][..., 1])
  assert not np.array_equal(r[..., 0], pytree.flatten(branch)[ROUTER][..., 0])


def test_slice_refuses_bad_keep_and_mismatched_trees(merged):
  params, cfg, branches = merged["ffn"]
  for keep in ([1, 2], [0], [0, 0], [0, 4]):
    with pytest.raises(BarError, match="must list distinct experts of 0..3, the anchor 0 first"):
      upgrade_lib.slice_experts(params, cfg, keep)
  with pytest.raises(BarError, match=r"router/kernel has shape \(2, 32, 2\), not \(2, 32, 3\)"):
    upgrade_lib.slice_experts(params, cfg, [0, 1, 2], router=branches[0][0])
  wide = transformer.init_params(tiny(vocab_size=300), jax.random.key(0))
  with pytest.raises(BarError, match="does not match the MoE's shared leaves"):
    upgrade_lib.slice_experts(params, cfg, [0, 1], shared=wide)


# ----------------------------------------------------------------------------------------------------------------
# The stage: mode=remove and mode=oracle on the tiny artifacts of tests/test_upgrade.py

@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
  return tiny_artifacts(tmp_path_factory)


def config(dirs, **kw):
  c = upgrade_config.get_config("tiny")
  c.model = dirs[kw.pop("model", "moe3")]
  c.branch = dirs[kw.pop("branch")] if "branch" in kw else ""
  c.routing.max_rows = 0  # routing diagnostics: tests/test_upgrade.py covers them
  c.update(kw)
  return c


def read(d):
  a = artifact.read(d)
  return a, pytree.flatten(a.params)


def test_stage_remove_drops_the_expert_and_nothing_else(dirs, tmp_path):
  out = str(tmp_path / "minus_math")
  assert upgrade_stage.run(config(dirs, mode="remove", expert="math", router_update="none"), out) == out
  (moe_, m), (new, n) = read(dirs["moe3"]), read(out)
  mm = new.manifest
  assert new.cfg.n_experts == 2 and mm["experts"] == ["anchor", "tool_use"]
  for p in m:
    if not p.startswith("layers/moe/"):
      assert mm["leaf_fingerprints"][p] == moe_.manifest["leaf_fingerprints"][p], p
      np.testing.assert_array_equal(n[p], m[p])
  for p in ("layers/moe/experts/gate", "layers/moe/experts/up", "layers/moe/experts/down"):
    np.testing.assert_array_equal(n[p], m[p][:, [0, 2]])
  np.testing.assert_array_equal(n[ROUTER], m[ROUTER][..., [0, 2]])  # router_update none: the columns as they were
  # The manifest's expert fingerprints are the new numbering's; renamed to the old one they are the input's.
  assert mm["expert_fingerprints"] == upgrade_lib.expert_fingerprints(new.params, new.cfg)
  before = upgrade_lib.expert_fingerprints(moe_.params, moe_.cfg)  # (the merge stage records none)
  assert upgrade_lib.expert_fingerprints(new.params, new.cfg, slots=[0, 2]) == {
      k: v for k, v in before.items() if not k.endswith("[1]")}
  assert mm["upgrade"] == {"mode": "remove", "expert": 1, "domain": "math", "removed": "math", "slots": [0, 2]}
  assert [(p["fingerprint"], p["role"]) for p in mm["parents"]] == [(moe_.manifest["fingerprint"], "moe")]
  assert [s["stage"] for s in mm["stages"]] == ["upgrade"] and mm["router_update"] == "none"
  assert "math" not in (mm.get("capabilities") or {})
  # The same command again: the finished artifact is returned as it is (the workdir contract).
  assert upgrade_stage.run(config(dirs, mode="remove", expert="math", router_update="none"), out) == out


@pytest.mark.parametrize("kw,match", [
    ({"model": "moe2", "expert": "math"}, "would leave only the anchor"),
    ({"expert": -1}, "mode=remove needs the expert to drop"),
    ({"expert": "code"}, "the MoE has no expert named 'code'"),
    ({"expert": 0}, "expert index 0 is out of range"),
    ({"expert": "math", "router_update": "local"}, "router_update=local trains a new expert's column"),
    ({"expert": "math", "branch": "math"}, "mode=remove takes no branch"),
])
def test_stage_remove_refuses_one_line_nothing_written(dirs, tmp_path, kw, match):
  out = tmp_path / "rm"
  with pytest.raises(BarError, match=match) as e:
    upgrade_stage.run(config(dirs, mode="remove", **{"router_update": "none", **kw}), str(out))
  assert "\n" not in str(e.value)
  assert not out.exists()


def test_stage_oracle_is_the_slice_with_the_branch_router(dirs, tmp_path):
  out = str(tmp_path / "oracle_tool_use")
  c = config(dirs, mode="oracle", branch="tool_use", router_update="none")  # expert -1: the branch's domain
  assert upgrade_stage.run(c, out) == out
  (moe_, m), (orc, o), (br, b) = read(dirs["moe3"]), read(out), read(dirs["tool_use"])
  # Against plain numpy: experts [0, 2] of the MoE, the branch's router kernel, the MoE's (merged) shared leaves.
  assert set(o) == set(m)
  for p, x in o.items():
    want = b[p] if p == ROUTER else m[p][:, [0, 2]] if p.startswith("layers/moe/experts/") else m[p]
    np.testing.assert_array_equal(x, want, err_msg=p)
  sliced, scfg = upgrade_lib.slice_experts(moe_.params, moe_.cfg, [0, 2], router=br.params)
  for p, x in pytree.flatten(sliced).items():
    np.testing.assert_array_equal(o[p], x, err_msg=p)
  assert orc.cfg == scfg == br.cfg
  assert not np.array_equal(o["layers/attn/q/kernel"], b["layers/attn/q/kernel"])  # the merged shared weights
  mm = orc.manifest
  assert mm["kind"] == "moe" and mm["experts"] == ["anchor", "tool_use"]
  assert mm["upgrade"]["mode"] == "oracle" and mm["upgrade"]["expert"] == 2
  assert [(p["fingerprint"], p["role"]) for p in mm["parents"]] == [
      (moe_.manifest["fingerprint"], "moe"), (br.manifest["fingerprint"], "branch")]
  # The evaluate stage scores it like any artifact.
  from bar_jax.stages import evaluate
  from configs.evaluate import get_config
  ec = get_config()
  ec.update(model=out, domains="tool_use", n_per_domain=2, max_new_tokens=4, batch_size=2, max_prompt_tokens=256)
  report = json.load(open(os.path.join(evaluate.run(ec, str(tmp_path / "eval")), "eval.json")))
  (row,) = report["models"]
  assert row["kind"] == "moe" and row["domains"]["tool_use"]["n"] == 2


@pytest.mark.parametrize("kw,match", [
    ({"branch": "tool_use_v2"}, "expert 2 .tool_use. of .* is not the domain expert of branch"),
    ({"branch": "tool_use", "router_update": "full"}, "mode=oracle keeps the branch's own router columns"),
    ({"branch": "tool_use", "expert": "math"}, "expert 1 is 'math' but branch .* is 'tool_use': the oracle"),
])
def test_stage_oracle_refuses_one_line_nothing_written(dirs, tmp_path, kw, match):
  out = tmp_path / "orc"
  with pytest.raises(BarError, match=match) as e:
    upgrade_stage.run(config(dirs, mode="oracle", **{"router_update": "none", **kw}), str(out))
  assert "\n" not in str(e.value)
  assert not out.exists() or not os.listdir(out)
