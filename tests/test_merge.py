"""The merge transform (experts, router, shared-parameter rules) and the merge stage (checks, lineage, no partial
writes)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bar_jax.errors import BarError
from bar_jax import pytree
from bar_jax.io import artifact
from bar_jax.model import moe, transformer
from bar_jax.model.config import COMPUTE_KEYS, ModelConfig, tiny
from bar_jax.stages import merge as merge_stage
from bar_jax.transforms import merge as merge_lib
from bar_jax.transforms.upcycle import upcycle
from configs import merge as merge_config
from numerics import ulps

CFG = tiny(vocab_size=259)
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
forward = jax.jit(lambda p, t, cfg: transformer.forward(p, t, cfg)[0], static_argnums=2)
expert_out = jax.jit(lambda p, w, x, cfg: moe.dense_dispatch(x, w, *moe.expert_weights(p, cfg)), static_argnums=3)


def trained_branch(base, kind, seed, shared=True):
  """A branch as if trained: domain expert (or adapter), router and (optionally) attention moved off the base."""
  branch, cfg = upcycle(base, CFG, expert_kind=kind, lora_rank=4, key=jax.random.key(seed))
  branch = jax.tree.map(lambda x: x, branch)  # new containers: upcycle shares base's dicts, which must not change
  rng = np.random.default_rng(seed)
  noise = lambda x, s=0.1: np.asarray(x) + s * rng.standard_normal(np.shape(x)).astype(np.float32)  # noqa: E731
  m = branch["layers"]["moe"]
  if kind == "ffn":
    m["experts"] = {w: np.asarray(x).copy() for w, x in m["experts"].items()}
    for w in m["experts"]:
      m["experts"][w][:, 1] = noise(m["experts"][w][:, 1])
  else:
    m["lora"] = {w: {"a": noise(ab["a"]), "b": noise(ab["b"])} for w, ab in m["lora"].items()}
  m["router"]["kernel"] = noise(m["router"]["kernel"], 1.0)
  if shared:
    branch["layers"]["attn"]["q"]["kernel"] = noise(branch["layers"]["attn"]["q"]["kernel"])
    branch["embed"]["embedding"] = noise(branch["embed"]["embedding"])
  return branch, cfg


@pytest.fixture(scope="module")
def base():
  return jax.tree.map(np.asarray, transformer.init_params(CFG, jax.random.key(0)))


# ----------------------------------------------------------------------------------------------------------------
# The transform.

def test_as_flat_reads_nested_and_passes_flat_mappings_through():
  """The merge and upgrade transforms read parameters through pytree.as_flat: a nested dict gives flatten's paths
  and leaves (the same objects), a flat mapping (a lazy reader's) comes back as it is, nothing indexed."""
  nested = {"embed": {"embedding": np.zeros(2)}, "layers": {"attn": {"q": {"kernel": np.ones(3)}}}}
  flat = pytree.as_flat(nested)
  assert flat == pytree.flatten(nested) and set(flat) == {"embed/embedding", "layers/attn/q/kernel"}
  assert flat["layers/attn/q/kernel"] is nested["layers"]["attn"]["q"]["kernel"]

  class Lazy(dict):
    def __getitem__(self, k):
      raise AssertionError("read")
  lazy = Lazy({"embed/embedding": None})
  assert pytree.as_flat(lazy) is lazy


def test_rules_on_hand_checked_numbers():
  cfg = tiny(ffn="moe", n_experts=2)
  base = {"embed/embedding": np.ones((1, 4), np.float32)}
  deltas = [[1, -2, .5, 3], [-3, 1, .2, 1.5], [2, -1, -.1, -.5]]
  router = lambda a, d: np.array([[[a, d]]], np.float32)  # noqa: E731  [L=1, D=1, 2]
  expert = lambda a, d: np.array([[[[a]], [[d]]]], np.float32)  # noqa: E731  [L=1, 2, D=1, F=1]
  branches = [{"embed/embedding": 1 + np.array([d], np.float32), "layers/moe/router/kernel": router(i, 10 + i),
               "layers/moe/experts/gate": expert(5, 20 + i)} for i, d in enumerate(deltas)]
  run = lambda rule, **kw: merge_lib.merge(base, branches, [cfg] * 3, rule=rule, **kw)[0]  # noqa: E731
  avg = run("average")  # base (ones) + 3 branches: 1 + (summed deltas) / 4
  # float32 inputs (each within half an ulp of these decimals), a float64 mean rounded once: within one ulp (2**-23).
  np.testing.assert_allclose(avg["embed"]["embedding"], [[1, 1 - 2 / 4, 1 + .6 / 4, 1 + 4 / 4]], rtol=2**-23)
  avg_branches = run("average_branches")
  np.testing.assert_allclose(avg_branches["embed"]["embedding"], [[1, 1 - 2 / 3, 1 + .2, 1 + 4 / 3]], rtol=2**-23)
  np.testing.assert_array_equal(avg["layers"]["moe"]["router"]["kernel"], [[[1, 10, 11, 12]]])  # mean(0, 1, 2) = 1
  np.testing.assert_array_equal(avg["layers"]["moe"]["experts"]["gate"][0, :, 0, 0], [5, 20, 21, 22])
  np.testing.assert_array_equal(run("base")["embed"]["embedding"], base["embed/embedding"])
  weighted = run("weighted", weights=[1, 1, 2])  # normalised to .25, .25, .5
  np.testing.assert_allclose(weighted["embed"]["embedding"], [[1.5, .25, 1.125, 1.875]], rtol=2**-23)
  # TIES, density .5 keeps 2 of 4 per branch: [0,-2,0,3], [-3,0,0,1.5], [2,-1,0,0]; summed [-1,-3,0,4.5] elects
  # signs [-,-,0,+]; the agreeing means are -3, -1.5, 0, 2.25.
  ties = run("ties", ties_density=0.5)
  np.testing.assert_allclose(ties["embed"]["embedding"], [[-2, -.5, 1, 3.25]], rtol=2**-23)
  for rule in ("ties", "average"):
    with pytest.raises(BarError, match="needs the base"):
      merge_lib.merge(None, branches, [cfg] * 3, rule=rule)
  with pytest.raises(BarError, match="non-negative weights"):
    run("weighted", weights=[1, 2])


@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_one_hot_routing_selects_each_branch_expert(base, kind):
  branches = [trained_branch(base, kind, seed) for seed in (1, 2, 3)]
  merged, mcfg = merge_lib.merge(base, [b for b, _ in branches], [c for _, c in branches])
  assert mcfg.n_experts == 4 and mcfg.expert_kind == kind
  x = jax.random.normal(jax.random.key(9), (8, CFG.d_model))
  layer = lambda p, l: jax.tree.map(lambda a: jnp.asarray(a)[l], p["layers"]["moe"])  # noqa: E731
  for l in range(CFG.n_layers):
    for i in range(mcfg.n_experts):
      got = expert_out(layer(merged, l), jax.nn.one_hot(jnp.full((8,), i), 4), x, mcfg)
      b, bcfg = branches[max(i - 1, 0)]  # expert 0 is every branch's anchor
      want = expert_out(layer(b, l), jax.nn.one_hot(jnp.full((8,), min(i, 1)), 2), x, bcfg)
      # A 4-expert and a 2-expert program (XLA may block the D=32 / F=64 sums differently per shape): float32
      # outputs of order 1 agree to ~sqrt(F) ulps; 64 ulps of the largest output bounds it on any CPU.
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=ulps(want, 64))
  router = merged["layers"]["moe"]["router"]["kernel"]
  np.testing.assert_array_equal(router[..., 2], branches[1][0]["layers"]["moe"]["router"]["kernel"][..., 1])
  anchors = np.mean([np.asarray(b["layers"]["moe"]["router"]["kernel"][..., 0], np.float64) for b, _ in branches], 0)
  np.testing.assert_allclose(router[..., 0], anchors, rtol=2**-23)  # a float64 mean rounded once to float32


@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_single_branch_average_reproduces_its_logits(base, kind):
  branch, bcfg = trained_branch(base, kind, 4)
  merged, mcfg = merge_lib.merge(base, [branch], [bcfg], rule="average_branches")
  assert mcfg == bcfg
  # Bit-identical parameters through the same jitted program on the same device: bit-identical logits.
  np.testing.assert_array_equal(np.asarray(forward(merged, TOKENS, mcfg)), np.asarray(forward(branch, TOKENS, bcfg)))


def test_streams_one_leaf_at_a_time(base):
  """Branches given as lazy mappings are read path by path: no output leaf needs two input leaves of a branch."""
  reads = []

  class Lazy(dict):
    def __init__(self, tree, name):
      super().__init__(pytree.flatten(tree))
      self.name = name

    def __getitem__(self, path):
      reads.append((path, self.name))
      return super().__getitem__(path)

  (b1, c1), (b2, c2) = trained_branch(base, "ffn", 1), trained_branch(base, "ffn", 2)
  merged, _ = merge_lib.merge(None, [Lazy(b1, 1), Lazy(b2, 2)], [c1, c2], rule="average_branches")
  paths = [p for p, _ in reads]
  assert sorted(set(paths)) == sorted(pytree.flatten(b1)) and len(reads) == 2 * len(set(paths))
  for j in range(0, len(reads), 2):  # each path read once per branch, then never again
    assert reads[j][0] == reads[j + 1][0] and {reads[j][1], reads[j + 1][1]} == {1, 2}
  want = (np.asarray(b1["layers"]["attn"]["q"]["kernel"], np.float64) + b2["layers"]["attn"]["q"]["kernel"]) / 2
  np.testing.assert_allclose(merged["layers"]["attn"]["q"]["kernel"], want, rtol=2**-23)  # float64 mean, rounded once


# ----------------------------------------------------------------------------------------------------------------
# The stage.

def write_branch(root, name, params, cfg, tok, base_fp, **manifest):
  d = os.path.join(root, name)
  m = dict(kind="branch", model=cfg.to_dict(), base_fingerprint=base_fp, domain=name, ledger={})
  m.update(manifest)
  artifact.write(d, params, m, tok)
  return d


@pytest.fixture(scope="module")
def branch_dirs(base, byte_tokenizer, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("branches"))
  fp = artifact.fingerprint(base)
  base_dir = os.path.join(root, "base")
  artifact.write(base_dir, base, dict(kind="dense", model=CFG.to_dict(), ledger={}), byte_tokenizer)
  dirs = {name: write_branch(root, name, *trained_branch(base, "ffn", seed), byte_tokenizer, fp)
          for name, seed in (("math", 1), ("code", 2))}
  other, ocfg = upcycle(base, CFG, expert_kind="lora", lora_rank=4)
  dirs["lora"] = write_branch(root, "lora", other, ocfg, byte_tokenizer, fp)
  dirs["otherbase"] = write_branch(root, "otherbase", *trained_branch(base, "ffn", 3), byte_tokenizer, "0" * 64)
  wide = tiny(vocab_size=259, n_heads=8, n_kv_heads=2)
  dirs["wide"] = write_branch(root, "wide", *upcycle(transformer.init_params(wide, jax.random.key(0)), wide),
                              byte_tokenizer, fp)
  corrupt = write_branch(root, "corrupt", *trained_branch(base, "ffn", 5), byte_tokenizer, fp)
  with open(os.path.join(corrupt, artifact.MANIFEST)) as f:
    m = json.load(f)
  m["leaf_fingerprints"]["layers/attn/q/kernel"] = "0" * 64  # as if the q kernel's bytes had changed on disk
  with open(os.path.join(corrupt, artifact.MANIFEST), "w") as f:
    json.dump(m, f)
  dirs["corrupt"], dirs["base"], dirs["root"] = corrupt, base_dir, root
  return dirs


def stage_config(branches, **kw):
  c = merge_config.get_config()
  c.branches = ",".join(branches)
  c.update(kw)
  return c


def test_stage_writes_moe_artifact_with_lineage(branch_dirs, tmp_path):
  out = str(tmp_path / "moe")
  c = stage_config([branch_dirs["math"], branch_dirs["code"]], base=branch_dirs["base"], place_on_mesh=True)
  assert merge_stage.run(c, out) == out
  art = artifact.read(out)
  m = art.manifest
  assert m["kind"] == "moe" and m["experts"] == ["anchor", "math", "code"] and art.cfg.n_experts == 3
  assert m["base_fingerprint"] == artifact.read_manifest(branch_dirs["math"])["base_fingerprint"]
  assert [p["role"] for p in m["parents"]] == ["branch", "branch", "base"]
  assert [p["name"] for p in m["parents"]][:2] == ["math", "code"]
  # Against plain numpy, not the transform the stage calls: expert 0 and router column 0 the branches' mean anchor,
  # expert / column i branch i's domain slot, every shared leaf the mean of the base and the two branches.
  base_flat = pytree.flatten(artifact.read(branch_dirs["base"]).params)
  math_, code = (pytree.flatten(artifact.read(branch_dirs[n]).params) for n in ("math", "code"))
  got = pytree.flatten(art.params)
  assert set(got) == set(math_)
  assert not np.array_equal(math_["layers/attn/q/kernel"], code["layers/attn/q/kernel"])  # the mean is exercised
  for path, x in got.items():
    a, b = np.asarray(math_[path], np.float64), np.asarray(code[path], np.float64)
    if path == "layers/moe/router/kernel":
      want = np.stack([(a[..., 0] + b[..., 0]) / 2, a[..., 1], b[..., 1]], axis=-1)
    elif path.startswith("layers/moe/experts/"):
      want = np.stack([(a[:, 0] + b[:, 0]) / 2, a[:, 1], b[:, 1]], axis=1)
    else:
      want = (np.asarray(base_flat[path], np.float64) + a + b) / 3
    assert np.asarray(x).dtype == np.float32 and x.shape == want.shape, path
    # A float64 mean of float32 numbers (exact sums, one division) rounded once: within one float32 ulp.
    np.testing.assert_allclose(np.asarray(x), want, rtol=2**-23, atol=0, err_msg=path)


@pytest.mark.parametrize("names,match", [
    (["math", "otherbase"], "otherbase was trained from base"),
    (["math", "wide"], "wide has a different architecture"),
    (["math", "lora"], "lora has expert_kind=lora"),
    (["math", "code", "math"], "math is listed twice"),
    (["math", "missing"], "missing: the directory does not exist"),
    (["math", "corrupt"], "corrupt fails verification"),
    (["math", "base"], "base is a 'dense' artifact, not a branch"),
])
def test_stage_refuses_bad_branches(branch_dirs, tmp_path, names, match):
  out = tmp_path / "moe"
  dirs = [branch_dirs.get(n, os.path.join(branch_dirs["root"], n)) for n in names]
  with pytest.raises(BarError, match=match):
    merge_stage.run(stage_config(dirs, base=branch_dirs["base"]), str(out))
  assert not out.exists() or not os.listdir(out)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".moe")]  # no temporary left behind


# ----------------------------------------------------------------------------------------------------------------
# Architecture apart from compute.

def test_old_manifest_model_entry_migrates():
  """Manifests written before the architecture/compute split held the compute knobs inside "model"."""
  cfg = tiny(ffn="moe", n_experts=2)
  old = dict(cfg.to_dict(), dtype="bfloat16", remat="full", attention="cudnn", dispatch="dropless",
             capacity_factor=1.25)
  assert ModelConfig.from_dict(old) == cfg
  assert not set(cfg.to_dict()) & set(COMPUTE_KEYS)
  with pytest.raises(ValueError, match="unknown model config keys"):  # anything else unknown is still refused
    ModelConfig.from_dict(dict(cfg.to_dict(), rope_scaling_typo=2.0))


def test_merge_inherits_no_compute_setting(base, branch_dirs, byte_tokenizer, tmp_path):
  """Branch 0 written by the old code with its CPU remat and dispatch inside "model": the merged manifest records
  the architecture alone, so nothing of how a branch was trained or run reaches the merged model."""
  params, cfg = trained_branch(base, "ffn", 6)
  old = dict(cfg.to_dict(), dtype="float32", remat="full", attention="xla", dispatch="dropless", capacity_factor=0.0)
  fp = artifact.read_manifest(branch_dirs["code"])["base_fingerprint"]
  first = write_branch(str(tmp_path), "old_math", params, cfg, byte_tokenizer, fp, model=old)
  out = str(tmp_path / "moe")
  merge_stage.run(stage_config([first, branch_dirs["code"]], base=branch_dirs["base"]), out)
  m = artifact.read_manifest(out)
  assert set(m["model"]) == {f.name for f in dataclasses.fields(ModelConfig)}
  assert ModelConfig.from_dict(m["model"]) == cfg.replace(n_experts=3)
