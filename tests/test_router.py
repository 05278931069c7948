"""Router training: it helps (a synthetic two-domain MoE, trained with loop.train directly), the stage trains only the
router (bit-identity by leaf fingerprints and per-expert slices) and records lineage, data and cost; routing
diagnostics are exact token means."""
import json
import os

import jax
import numpy as np
import pytest

from bar_jax import sharding
from bar_jax.errors import BarError
from bar_jax.evals import routing
from bar_jax.io import artifact
from bar_jax.io import models
from bar_jax.model import transformer
from bar_jax.model.config import tiny
from bar_jax.stages import loop
from bar_jax.stages import router as router_stage
from configs.common import opt_defaults
from bar_jax.transforms import freeze
from bar_jax.transforms import upgrade as upgrade_lib
from configs import router as router_config
from router_helpers import tiny_artifacts

V, T, B = 64, 16, 8


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
  return tiny_artifacts(tmp_path_factory)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic: domain A counts up by 1 in tokens [0, 32), domain B by 7 in [32, 64). Like two branches, one dense
# model's FFN is trained on A only and, from the same start, on B only (everything else frozen); the MoE stacks
# [anchor (adds nothing), FFN_A, FFN_B] with a zero (uniform) router; then only the router trains on the mix.

def rows(domain, n, rng):
  start = rng.integers(0, V // 2, size=(n, 1))
  step = 1 if domain == "A" else 7
  seq = (start + step * np.arange(T + 1)[None]) % (V // 2) + (0 if domain == "A" else V // 2)
  return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
          "mask": np.ones((n, T), np.float32), "segment_ids": np.ones((n, T), np.int32),
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (n, T)).copy()}


def stream(domains, seed):
  rng = np.random.default_rng(seed)
  while True:
    parts = [rows(d, B // len(domains), rng) for d in domains]
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_router_training_routes_each_domain_to_its_expert(tmp_path):
  dense = tiny(vocab_size=V, max_seq_len=T)
  cfg = dense.replace(ffn="moe", n_experts=3)
  mesh = sharding.make_mesh({"data": -1})

  def phase(name, params, cfg, trainable, frozen, domains, steps, lr):
    part = freeze.make_partition(params, cfg, trainable, frozen)
    opt = opt_defaults(lr=lr, warmup_steps=0, schedule="constant")
    return models.to_host(loop.train(
        params=params, cfg=cfg, part=part, loss_fn=loop.lm_loss(cfg, mesh, z_loss=1e-3),
        batches=stream(domains, len(name)), opt=opt, steps=steps, workdir=str(tmp_path / name), mesh=mesh,
        identity={"phase": name}, log_every=steps, checkpoint_every=steps).params)

  base = jax.tree.map(np.asarray, transformer.init_params(dense, jax.random.key(0)))
  ffn = {d: phase(d, base, dense, [r"layers/mlp/.*"], [], [d], 60, 1e-2)["layers"]["mlp"] for d in "AB"}
  kernels = lambda w: [np.zeros_like(ffn["A"][w]["kernel"])] + [ffn[d][w]["kernel"] for d in "AB"]  # noqa: E731
  params = {k: v for k, v in base.items() if k != "layers"}
  params["layers"] = {k: v for k, v in base["layers"].items() if k != "mlp"}
  params["layers"]["moe"] = {"router": {"kernel": np.zeros((dense.n_layers, dense.d_model, 3), np.float32)},
                             "experts": {w: np.stack(kernels(w), axis=1) for w in ("gate", "up", "down")}}
  loss_fn = loop.lm_loss(cfg, mesh)
  mixed = next(stream(["A", "B"], 123))
  mixed_loss = jax.jit(lambda p: loss_fn(p, mixed)[1]["nll"])
  before = float(mixed_loss(params))
  trained = phase("router", params, cfg, list(freeze.SCHEDULE["router"]), [], ["A", "B"], 60, 3e-2)
  after = float(mixed_loss(trained))
  assert after < before - 0.1, (before, after)
  # Only the router kernel moved: every other leaf is bit-identical.
  fb, fa = artifact.leaf_fingerprints(params), artifact.leaf_fingerprints(trained)
  assert [p for p in fb if fb[p] != fa[p]] == [upgrade_lib.ROUTER]
  rng = np.random.default_rng(7)
  report = routing.routing_stats(trained, cfg, {d: rows(d, 8, rng) for d in "AB"}, batch_size=8,
                                 names=["anchor", "A", "B"])
  share = routing.summary(report)
  assert share["A"][1] > 0.6 and share["B"][2] > 0.6, share
  untrained = routing.summary(routing.routing_stats(params, cfg, {d: rows(d, 8, rng) for d in "AB"}, batch_size=8))
  assert untrained["A"][1] < share["A"][1] and untrained["B"][2] < share["B"][2]


def test_pack_rows_fills_every_slot_with_real_tokens():
  convs = [list(range(10, 15)), list(range(20, 27)), list(range(30, 34))]  # 5 + 7 + 4 = 16 tokens
  r = routing.pack_rows(convs, seq_len=6, max_rows=5)
  np.testing.assert_array_equal(r["inputs"].ravel(), [t for c in convs for t in c][:12])  # tail of 4 dropped
  np.testing.assert_array_equal(r["segment_ids"], [[1, 1, 1, 1, 1, 2], [1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(r["positions"], [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5]])


# ----------------------------------------------------------------------------------------------------------------
# The stage.

def test_router_stage_trains_only_the_router(dirs, tmp_path):
  out = str(tmp_path / "routed")
  c = router_config.get_config("tiny")
  c.model = dirs["moe3"]
  assert router_stage.run(c, out) == out
  src, new = artifact.read_manifest(dirs["moe3"]), artifact.read(out)
  m = new.manifest
  changed = [p for p in src["leaf_fingerprints"] if src["leaf_fingerprints"][p] != m["leaf_fingerprints"][p]]
  assert changed == [upgrade_lib.ROUTER]
  before = upgrade_lib.expert_fingerprints(artifact.read(dirs["moe3"]).params, new.cfg)
  assert upgrade_lib.changed_experts(before, m["expert_fingerprints"]) == []
  assert m["kind"] == "moe" and m["experts"] == ["anchor", "math", "tool_use"]
  assert m["parents"] == [{"name": src["name"], "fingerprint": src["fingerprint"], "role": "moe"}]
  rec, = m["stages"]
  assert rec["stage"] == "router" and rec["steps"] == 4 and rec["frozen_experts"] == []
  assert rec["trainable"] == [freeze.ROUTER] and rec["trainable_params"] == new.cfg.n_layers * new.cfg.d_model * 3
  assert rec["tokens"] == 4 * 8 * 256 and rec["flops"] > 0 and rec["data_fingerprint"]
  assert set(m["router_data"]["examples"]) == {"math", "tool_use", "general"} and m["router_data"]["stratified"]
  assert m["ledger"]["tokens"] == rec["tokens"]
  with open(os.path.join(out, routing.ROUTING_JSON)) as f:
    report = json.load(f)
  assert set(report["domains"]) == {"math", "tool_use", "general"} and report["experts"] == m["experts"]
  for stats in report["domains"].values():
    for name in routing.STATS:
      grid = np.asarray(stats[name])
      assert grid.shape == (new.cfg.n_layers, 3)
      # E=3 means of probabilities, each rounded to 5 decimals for the JSON (<= 5e-6 off): the sum is 1 within 2e-5.
      np.testing.assert_allclose(grid.sum(-1), 1.0, atol=1e-4)
  assert os.path.getsize(os.path.join(out, routing.ROUTING_PNG)) > 1000
  assert set(m["routing"]) == set(report["domains"])


@pytest.mark.parametrize("which,kw,match", [
    ("math", {}, "is a 'branch' artifact, not an moe"),
    ("nowhere", {}, "is neither an artifact directory"),
    ("moe3", {"router.domains": "math,poetry"}, "capability 'poetry'"),
])
def test_stage_refuses_bad_input(dirs, tmp_path, which, kw, match):
  c = router_config.get_config("tiny")
  c.model = dirs.get(which, os.path.join(dirs["root"], which))
  for k, v in kw.items():
    section, key = k.split(".")
    c[section][key] = v
  out = tmp_path / "routed"
  with pytest.raises(BarError, match=match) as e:
    router_stage.run(c, str(out))
  assert "\n" not in str(e.value) and not out.exists()


def test_topk_sweep_matches_the_evaluator_and_resumes(dirs, tmp_path):
  """experiments/topk_sweep.py: its top_k = E row is the model evaluated as it is, a smaller k really runs fewer
  experts, and the same command run again recomputes nothing and writes the same table."""
  import importlib.util
  from bar_jax import evals
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "topk_sweep.py")
  spec = importlib.util.spec_from_file_location("topk_sweep", path)
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  moe = models.load_model(dirs["moe3"])
  E = moe.cfg.n_experts
  wd, out = str(tmp_path / "wd"), str(tmp_path / "out")
  argv = [f"--model={dirs['moe3']}", "--domains=general", "--n_per_domain=2", f"--top_ks={E},1", f"--workdir={wd}",
          f"--out={out}"]
  sweep.main(argv)
  rows = json.load(open(os.path.join(wd, "topk.json")))["rows"]
  assert [r["top_k"] for r in rows] == [E, 1]
  want = evals.evaluate_model(moe.params, moe.cfg, moe.tokenizer, ["general"], n_per_domain=2)["domains"]["general"]
  assert rows[0]["domains"]["general"]["value"] == want["value"]
  assert rows[1]["domains"]["general"]["value"] != want["value"]
  assert rows[1]["active_matmul_params"] < rows[0]["active_matmul_params"]
  table = os.path.join(out, f"topk_sweep_{os.path.basename(dirs['moe3'])}.md")
  first, stamps = open(table).read(), {f: os.stat(os.path.join(wd, "k1", f)).st_mtime_ns
                                       for f in os.listdir(os.path.join(wd, "k1"))}
  sweep.main(argv)
  assert open(table).read() == first
  assert {f: os.stat(os.path.join(wd, "k1", f)).st_mtime_ns for f in stamps} == stamps
  # Renormalised: the same model at k = E, the kept weights scaled up to sum to 1 below it; a table of its own.
  sweep.main([a.replace(wd, wd + "_norm") for a in argv] + ["--norm_topk"])
  norm = json.load(open(os.path.join(wd + "_norm", "topk.json")))["rows"]
  assert norm[0]["domains"]["general"]["value"] == want["value"]
  assert norm[1]["domains"]["general"]["value"] != rows[1]["domains"]["general"]["value"]
  assert os.path.exists(table.replace(".md", "_norm.md")) and open(table).read() == first
