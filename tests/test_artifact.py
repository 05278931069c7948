"""Artifacts: round trip, fingerprints that catch one flipped byte, atomic writes that refuse to overwrite, sharded
restore, leaf-by-leaf streaming, and a ledger that counts a shared ancestor once."""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bar_jax.errors import BarError
from bar_jax.io import artifact
from bar_jax.model import transformer
from bar_jax.model.config import tiny


@pytest.fixture(scope="module")
def model():
  cfg = tiny()
  return cfg, transformer.init_params(cfg, jax.random.key(0))


def _manifest(cfg, **kw):
  return {"kind": "dense", "model": cfg.to_dict(), **kw}


def test_round_trip(model, byte_tokenizer, tmp_path):
  cfg, params = model
  d = str(tmp_path / "a")
  fp = artifact.write(d, params, _manifest(cfg), byte_tokenizer)
  assert artifact.is_complete(d) and fp == artifact.fingerprint(params)
  a = artifact.read(d)
  assert a.cfg == cfg and a.fingerprint == fp and a.manifest["kind"] == "dense"
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, params)
  assert a.tokenizer.encode("hi <|im_end|>") == byte_tokenizer.encode("hi <|im_end|>")
  assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary directory left behind


def test_fingerprint_covers_names_shapes_dtypes_and_bytes(model):
  _, params = model
  fp = artifact.fingerprint(params)
  flipped = jax.tree.map(np.array, params)
  flipped["final_norm"]["scale"].view(np.uint8)[3] ^= 1
  assert artifact.fingerprint(flipped) != fp
  renamed = {**params, "final_norm": {"weight": params["final_norm"]["scale"]}}
  assert artifact.fingerprint(renamed) != fp
  recast = {**params, "final_norm": {"scale": params["final_norm"]["scale"].astype("bfloat16")}}
  assert artifact.fingerprint(recast) != fp
  changed = artifact.leaf_fingerprints(flipped)
  same = artifact.leaf_fingerprints(params)
  assert [p for p in same if same[p] != changed[p]] == ["final_norm/scale"]


def test_verification_catches_a_flipped_byte_on_disk(model, byte_tokenizer, tmp_path):
  cfg, params = model
  d = str(tmp_path / "a")
  artifact.write(d, params, _manifest(cfg), byte_tokenizer)
  # Replace the stored parameters with a copy that differs in one bit of one leaf.
  flipped = jax.tree.map(np.array, params)
  flipped["embed"]["embedding"].view(np.uint8)[5] ^= 0x10
  shutil.rmtree(os.path.join(d, "params"))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(d, "params"), flipped)
  ckptr.wait_until_finished()
  with pytest.raises(BarError, match="embed/embedding") as e:
    artifact.read(d)
  assert "\n" not in str(e.value)
  artifact.read(d, verify=False)  # opt-out still loads


def test_write_refuses_to_overwrite(model, byte_tokenizer, tmp_path):
  cfg, params = model
  d = str(tmp_path / "a")
  fp = artifact.write(d, params, _manifest(cfg), byte_tokenizer)
  before = open(os.path.join(d, "manifest.json")).read()
  other = jax.tree.map(lambda x: x + 1, params)
  with pytest.raises(BarError, match="already holds an artifact"):
    artifact.write(d, other, _manifest(cfg), byte_tokenizer)
  assert open(os.path.join(d, "manifest.json")).read() == before
  assert artifact.read(d).fingerprint == fp
  with pytest.raises(BarError, match="kind"):
    artifact.write(str(tmp_path / "b"), params, {"kind": "blob", "model": cfg.to_dict()}, byte_tokenizer)
  assert not os.path.exists(tmp_path / "b")


def test_write_into_a_running_stage_dir_keeps_its_files(model, byte_tokenizer, tmp_path):
  cfg, params = model
  d = tmp_path / "run"
  (d / "checkpoints").mkdir(parents=True)
  (d / "checkpoints" / "keep").write_text("x")
  artifact.write(str(d), params, _manifest(cfg), byte_tokenizer)
  assert (d / "checkpoints" / "keep").read_text() == "x" and artifact.is_complete(str(d))


def test_missing_and_broken_artifacts_are_one_line_errors(tmp_path):
  with pytest.raises(BarError, match="does not exist"):
    artifact.read(str(tmp_path / "nope"))
  (tmp_path / "half").mkdir()
  with pytest.raises(BarError, match="no manifest.json"):
    artifact.read(str(tmp_path / "half"))
  (tmp_path / "half" / "manifest.json").write_text(json.dumps({"kind": "dense", "model": tiny().to_dict()}))
  with pytest.raises(BarError, match="cannot read parameters.*missing or damaged") as e:
    artifact.read(str(tmp_path / "half"))
  assert "\n" not in str(e.value)


def test_sharded_restore_and_leaf_streaming(model, byte_tokenizer, tmp_path):
  cfg, params = model
  d = str(tmp_path / "a")
  artifact.write(d, params, _manifest(cfg), byte_tokenizer)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec
  shard = lambda x: jax.sharding.NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "fsdp")
                                               if x.shape[-1] % 8 == 0 else P())
  shardings = jax.tree.map(shard, params)
  a = artifact.read(d, shardings=shardings)
  q = a.params["layers"]["attn"]["q"]["kernel"]
  assert q.sharding == shardings["layers"]["attn"]["q"]["kernel"] and len(q.addressable_shards) == 8
  lazy = artifact.open_params(d)
  assert len(lazy) == len(jax.tree.leaves(params)) and "layers/mlp/down/kernel" in lazy
  np.testing.assert_array_equal(np.asarray(lazy["layers/mlp/down/kernel"]),
                                np.asarray(params["layers"]["mlp"]["down"]["kernel"]))
  assert lazy.shape("embed/embedding").shape == (cfg.vocab_size, cfg.d_model)


def test_lineage_counts_a_shared_ancestor_once(model, byte_tokenizer, tmp_path):
  cfg, params = model
  base_stage = [{"stage": "sft", "tokens": 100, "flops": 1e6}]
  base_fp = artifact.write(str(tmp_path / "base"), params, _manifest(cfg, **artifact.lineage([], base_stage)),
                           byte_tokenizer)
  base = artifact.read_manifest(str(tmp_path / "base"))
  assert base["ledger"]["tokens"] == 100 and list(base["ledger"]["entries"]) == [base_fp]
  branches = []
  for i, name in enumerate(["math", "code"]):
    p = jax.tree.map(lambda x: x + i + 1, params)
    lin = artifact.lineage([{**base, "role": "base"}], [{"stage": "branch", "tokens": 10 * (i + 1), "flops": 5.0}])
    artifact.write(str(tmp_path / name), p, _manifest(cfg, **lin), byte_tokenizer)
    branches.append({**artifact.read_manifest(str(tmp_path / name)), "role": "branch"})
  merged = artifact.lineage(branches, [{"stage": "router", "tokens": 7, "flops": 1.0}])
  assert merged["ledger"]["tokens"] == 100 + 10 + 20 + 7  # the base's 100 counted once
  assert merged["ledger"]["flops"] == 1e6 + 5 + 5 + 1
  assert [(p["name"], p["role"]) for p in merged["parents"]] == [("math", "branch"), ("code", "branch")]
  assert branches[0]["parents"] == [{"name": "base", "fingerprint": base_fp, "role": "base"}]


def _dir_bytes(d):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_branch_stored_over_its_base(model, byte_tokenizer, tmp_path, kind):
  """A branch stores only what training changed (expert 1, router, the embedding here), names its base by
  fingerprint, and every reader puts the base's leaves and the anchor slices back, bit for bit."""
  from bar_jax.transforms import upcycle
  from bar_jax import pytree
  cfg, dense = model
  dense = jax.tree.map(np.asarray, dense)
  base_dir = str(tmp_path / "work" / "base")
  artifact.write(base_dir, dense, _manifest(cfg), byte_tokenizer)
  params, bcfg = upcycle.upcycle(dense, cfg, expert_kind=kind, lora_rank=4, key=jax.random.key(1))
  flat = {p: np.array(x) for p, x in pytree.flatten(params).items()}
  rng = np.random.default_rng(0)
  trained = [p for p in flat if p.startswith("layers/moe/") and "experts" not in p] + ["embed/embedding"]
  if kind == "ffn":
    flat["layers/moe/experts/up"][:, 1] += rng.standard_normal(flat["layers/moe/experts/up"][:, 1].shape)
  for p in trained:
    flat[p] = flat[p] + rng.standard_normal(flat[p].shape).astype(np.float32)
  params = pytree.unflatten(flat)
  full_dir, delta_dir = str(tmp_path / "work" / "full"), str(tmp_path / "work" / "branch")
  fp = artifact.write(full_dir, params, _manifest(bcfg, kind="branch"), byte_tokenizer)
  assert artifact.write(delta_dir, params, _manifest(bcfg, kind="branch"), byte_tokenizer, over_base=base_dir,
                        from_base=upcycle.ANCHOR_FROM_BASE) == fp
  ref = artifact.read_manifest(delta_dir)["over_base"]
  assert ref["fingerprint"] == artifact.read_manifest(base_dir)["fingerprint"] and ref["path"] == "../base"
  assert "layers/attn/q/kernel" in ref["leaves"] and "embed/embedding" not in ref["leaves"]
  assert set(ref["slices"]) == set(upcycle.ANCHOR_FROM_BASE)
  assert _dir_bytes(os.path.join(delta_dir, "params")) < 0.8 * _dir_bytes(os.path.join(full_dir, "params"))
  got = pytree.flatten(artifact.read(delta_dir).params)  # verified against the complete fingerprints
  assert sorted(got) == sorted(flat)
  for p, x in flat.items():
    np.testing.assert_array_equal(np.asarray(got[p]), x, err_msg=p)
  lazy = artifact.open_params(delta_dir)
  assert sorted(lazy) == sorted(flat)
  for p, x in flat.items():
    assert lazy.shape(p).shape == x.shape, p
    np.testing.assert_array_equal(np.asarray(lazy[p]), x, err_msg=p)
  copy = str(tmp_path / "alone")
  assert artifact.self_contained(delta_dir, copy) == fp

  os.rename(base_dir, base_dir + ".moved")  # the base gone: one line naming it and the fix
  for reader in (artifact.read, artifact.open_params):
    with pytest.raises(BarError, match="holds no artifact; put the base artifact back") as e:
      reader(delta_dir)
    assert "\n" not in str(e.value)
  assert artifact.read(copy).fingerprint == fp  # the self-contained copy needs no base
  other = jax.tree.map(lambda x: np.asarray(x) + 1, dense)
  artifact.write(base_dir, other, _manifest(cfg), byte_tokenizer)  # another model where the base was
  with pytest.raises(BarError, match=f"over base {ref['fingerprint'][:12]}, but .* holds"):
    artifact.read(delta_dir)
