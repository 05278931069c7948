"""Tiny branch and MoE artifacts shared by tests/test_router.py and tests/test_upgrade.py (built once a session).

The tiny random model with the real tokenizer (io.models.load_model("tiny")), branches "as if trained" (domain
expert, router and shared leaves moved off the base by seeded noise), written as real artifacts, merged by the merge
stage. Domains math, tool_use and general are the registry's quickest to load.
"""
import os

import jax
import numpy as np

from bar_jax.io import artifact
from bar_jax.io import models
from bar_jax.model import transformer
from bar_jax.model.config import tiny
from bar_jax.stages import merge as merge_stage
from bar_jax.transforms.upcycle import upcycle
from configs import merge as merge_config

_CACHE: dict = {}


def trained_branch(base, cfg, seed, shared=True):
  branch, bcfg = upcycle(base, cfg, expert_kind="ffn", key=jax.random.key(seed))
  branch = jax.tree.map(np.array, branch)
  rng = np.random.default_rng(seed)
  noise = lambda x, s=0.1: (x + s * rng.standard_normal(x.shape)).astype(np.float32)  # noqa: E731
  m = branch["layers"]["moe"]
  for w in m["experts"]:
    m["experts"][w][:, 1] = noise(m["experts"][w][:, 1])
  m["router"]["kernel"] = noise(m["router"]["kernel"], 0.5)
  if shared:
    branch["layers"]["attn"]["q"]["kernel"] = noise(branch["layers"]["attn"]["q"]["kernel"])
  return branch, bcfg


def write_branch(root, name, domain, params, cfg, tok, base_fp):
  d = os.path.join(root, name)
  artifact.write(d, params, dict(kind="branch", model=cfg.to_dict(), base_fingerprint=base_fp, domain=domain,
                                 ledger={}), tok)
  return d


def merge(branches, out, **kw):
  c = merge_config.get_config()
  c.branches = ",".join(branches)
  c.rule = "average_branches"  # no base artifact is written here; the shared leaves do not matter to these tests
  c.update(kw)
  return merge_stage.run(c, out)


def tiny_artifacts(tmp_path_factory) -> dict:
  """{name: dir}: branches math, tool_use, tool_use_v2 (newer, same base), otherbase (tool_use, another base),
  wide (another architecture), moe3 = [anchor, math, tool_use], moe2 = [anchor, math]; plus the base params."""
  if _CACHE:
    return _CACHE
  root = str(tmp_path_factory.mktemp("tiny_bar"))
  base = models.load_model("tiny")
  fp = base.manifest["fingerprint"]
  dirs = {}
  for name, domain, seed in (("math", "math", 1), ("tool_use", "tool_use", 2), ("tool_use_v2", "tool_use", 3)):
    dirs[name] = write_branch(root, name, domain, *trained_branch(base.params, base.cfg, seed), base.tokenizer, fp)
  dirs["otherbase"] = write_branch(root, "otherbase", "tool_use", *trained_branch(base.params, base.cfg, 4),
                                   base.tokenizer, "0" * 64)
  wide = tiny(vocab_size=base.cfg.vocab_size, max_seq_len=512, tie_embeddings=True, d_ff=48)
  wide_params = jax.tree.map(np.asarray, transformer.init_params(wide, jax.random.key(0)))
  dirs["wide"] = write_branch(root, "wide", "safety", *upcycle(wide_params, wide), base.tokenizer, fp)
  dirs["moe3"] = merge([dirs["math"], dirs["tool_use"]], os.path.join(root, "moe3"))
  dirs["moe2"] = merge([dirs["math"]], os.path.join(root, "moe2"))
  dirs["root"] = root
  _CACHE.update(dirs)
  return _CACHE
