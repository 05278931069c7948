"""Upgrade: the pure replace/add transforms, and the stage (bit-identity of everything untouched, lineage, local
router update, one-line errors with nothing written)."""
import os

import numpy as np
import pytest

from bar_jax.errors import BarError
from bar_jax import pytree
from bar_jax.io import artifact
from bar_jax.stages import upgrade as upgrade_stage
from bar_jax.transforms import upgrade as upgrade_lib
from configs import upgrade as upgrade_config
from router_helpers import tiny_artifacts

ROUTER, GATE = upgrade_lib.ROUTER, "layers/moe/experts/gate"


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
  return tiny_artifacts(tmp_path_factory)


def read(d):
  a = artifact.read(d)
  return a, pytree.flatten(a.params)


def config(dirs, branch, **kw):
  c = upgrade_config.get_config("tiny")
  c.model, c.branch = dirs[kw.pop("model", "moe3")], dirs[branch]
  c.update(kw)
  return c


def shared_paths(flat):
  return [p for p in flat if not p.startswith("layers/moe/")]


def test_transforms_touch_only_the_named_slot(dirs):
  (moe, m), (br, b) = read(dirs["moe3"]), read(dirs["tool_use_v2"])
  out = pytree.as_flat(upgrade_lib.replace(moe.params, moe.cfg, br.params, br.cfg, 2))
  for p in shared_paths(m):
    np.testing.assert_array_equal(out[p], m[p])
  for p in (GATE, "layers/moe/experts/down", ROUTER):
    take = (lambda x, e: x[..., e]) if p == ROUTER else (lambda x, e: x[:, e])  # noqa: E731
    np.testing.assert_array_equal(take(out[p], 0), take(m[p], 0))
    np.testing.assert_array_equal(take(out[p], 1), take(m[p], 1))
    np.testing.assert_array_equal(take(out[p], 2), take(b[p], 1))
    assert not np.array_equal(take(out[p], 2), take(m[p], 2))
  added, cfg = upgrade_lib.add(moe.params, moe.cfg, br.params, br.cfg)
  added = pytree.as_flat(added)
  assert cfg.n_experts == 4 and added[GATE].shape[1] == 4 and added[ROUTER].shape[-1] == 4
  np.testing.assert_array_equal(added[GATE][:, :3], m[GATE])
  np.testing.assert_array_equal(added[GATE][:, 3], b[GATE][:, 1])
  np.testing.assert_array_equal(added[ROUTER][..., :3], m[ROUTER])
  np.testing.assert_array_equal(added[ROUTER][..., 3], b[ROUTER][..., 1])
  before, after = (upgrade_lib.expert_fingerprints(x, moe.cfg) for x in (moe.params, out))
  assert upgrade_lib.changed_experts(before, after) == [2]
  assert upgrade_lib.changed_experts(before, upgrade_lib.expert_fingerprints(added, cfg)) == [3]


def test_replace_retrains_only_the_router(dirs, tmp_path):
  out = str(tmp_path / "up")
  assert upgrade_stage.run(config(dirs, "tool_use_v2"), out) == out
  (moe, m), (new, n), (_, b) = read(dirs["moe3"]), read(out), read(dirs["tool_use_v2"])
  mm = new.manifest
  # Attention, embeddings and norms: leaf fingerprints equal the input's; experts 0 and 1 slice by slice.
  for p in shared_paths(m):
    assert mm["leaf_fingerprints"][p] == moe.manifest["leaf_fingerprints"][p], p
  before = upgrade_lib.expert_fingerprints(moe.params, moe.cfg)
  assert upgrade_lib.changed_experts(before, mm["expert_fingerprints"]) == [2]
  assert upgrade_lib.changed_experts(before, mm["expert_fingerprints"], include_router=True) == [0, 1, 2]
  np.testing.assert_array_equal(n[GATE][:, 2], b[GATE][:, 1])  # the newer branch's expert, as is
  assert mm["experts"] == ["anchor", "math", "tool_use"] and mm["upgrade"]["expert"] == 2
  assert mm["upgrade"]["replaced"] == "tool_use"
  assert [(p["fingerprint"], p["role"]) for p in mm["parents"]] == [
      (moe.manifest["fingerprint"], "moe"), (artifact.read_manifest(dirs["tool_use_v2"])["fingerprint"], "branch")]
  assert [s["stage"] for s in mm["stages"]] == ["upgrade", "router_full"]
  assert mm["stages"][1]["steps"] == 4 and mm["stages"][1]["frozen_experts"] == []
  assert set(mm["stages"][1]["data"]["examples"]) == {"math", "tool_use", "general"}
  assert os.path.isfile(os.path.join(out, "routing.json")) and os.path.isfile(os.path.join(out, "routing.png"))


def test_add_with_local_router_update(dirs, tmp_path):
  out = str(tmp_path / "add")
  upgrade_stage.run(config(dirs, "tool_use", model="moe2", mode="add", router_update="local"), out)
  (moe, m), (new, n), (_, b) = read(dirs["moe2"]), read(out), read(dirs["tool_use"])
  assert new.cfg.n_experts == 3 and new.manifest["experts"] == ["anchor", "math", "tool_use"]
  for p in shared_paths(m):
    assert new.manifest["leaf_fingerprints"][p] == moe.manifest["leaf_fingerprints"][p], p
  np.testing.assert_array_equal(n[GATE][:, :2], m[GATE])
  np.testing.assert_array_equal(n[GATE][:, 2], b[GATE][:, 1])
  # Local update: the old router columns are bit-identical, only the new one trained (from the branch's column).
  np.testing.assert_array_equal(n[ROUTER][..., :2], m[ROUTER])
  assert not np.array_equal(n[ROUTER][..., 2], b[ROUTER][..., 1])
  rec = new.manifest["stages"][1]
  assert rec["stage"] == "router_local" and rec["frozen_experts"] == [0, 1]
  assert rec["data"]["fractions"] == {"tool_use": 0.05, "math": 0.01, "general": 0.01}


@pytest.mark.parametrize("branch,kw,match", [
    ("otherbase", {}, "was trained from base 000000000000, but the MoE from"),
    ("tool_use_v2", {"expert": 1}, "expert 1 is 'math' but branch .* is 'tool_use': pass "
                                   "--config.allow_domain_change=True"),
    ("tool_use_v2", {"expert": 3}, r"expert index 3 is out of range: this MoE has experts 1..2"),
    ("tool_use_v2", {"expert": 0, "allow_domain_change": True}, "expert index 0 is out of range"),
    ("wide", {"mode": "add"}, r"has a different architecture from the MoE \(d_ff=48 vs 64\)"),
    ("tool_use", {"mode": "add"}, "already has a 'tool_use' expert"),
    ("math", {"model": "math"}, "is a 'branch' artifact, not an moe"),
])
def test_bad_input_one_line_nothing_written(dirs, tmp_path, branch, kw, match):
  out = tmp_path / "up"
  with pytest.raises(BarError, match=match) as e:
    upgrade_stage.run(config(dirs, branch, **kw), str(out))
  assert "\n" not in str(e.value)
  assert not out.exists()
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".up")]
