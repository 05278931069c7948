"""The trainer: same loss curve on 1 and 8 devices, exact resume after kill -9, one-line errors for bad input."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from bar_jax import sharding, stage_configs, train
from bar_jax.errors import BarError
from bar_jax.io import artifact
from bar_jax.model import config as config_lib, transformer
from bar_jax.stages import loop
from bar_jax.transforms import freeze
from configs.common import opt_defaults
from tests.run_helpers import kill_at_first_checkpoint, one_device_env, walk_keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SyntheticBatches:
  """Deterministic random token batches with get_state/set_state, like a grain iterator."""

  def __init__(self, batch=16, seq=32, vocab=256):
    self.i, self.batch, self.seq, self.vocab = 0, batch, seq, vocab

  def __next__(self):
    rng = np.random.default_rng(self.i)
    self.i += 1
    x = rng.integers(0, self.vocab, (self.batch, self.seq + 1)).astype(np.int32)
    seg = np.ones((self.batch, self.seq), np.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:], "mask": np.ones((self.batch, self.seq), np.float32),
            "segment_ids": seg, "positions": np.tile(np.arange(self.seq, dtype=np.int32), (self.batch, 1))}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def opt(lr=1e-2):
  return opt_defaults(lr=lr, warmup_steps=2)


def run_loop(cfg, params, mesh, workdir, steps=6, trainable=(r".*",), frozen_experts=(), accum=1, hooks=(),
             log_every=1):
  part = freeze.make_partition(params, cfg, list(trainable), frozen_experts)
  it = SyntheticBatches(vocab=cfg.vocab_size)
  return loop.train(params=params, cfg=cfg, part=part, loss_fn=loop.lm_loss(cfg, mesh, z_loss=1e-3), batches=it,
                    opt=opt(), steps=steps, workdir=workdir, mesh=mesh, identity={"test": 1}, accum=accum,
                    checkpoint_every=100, log_every=log_every, data_iter=it, hooks=hooks)


def test_periodic_eval_hook_sees_the_parameters_of_its_step(tmp_path):
  cfg = config_lib.tiny()
  params = transformer.init_params(cfg, jax.random.key(0))
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  seen = []

  class Norm(loop.Hook):
    every = 2

    def evaluate(self, done, p):
      seen.append((done, jax.tree.map(np.asarray, p)))
      return {"eval_embed_norm": float(np.linalg.norm(np.asarray(p["embed"]["embedding"])))}

  result = run_loop(cfg, params, mesh, str(tmp_path / "w"), steps=6, hooks=[Norm()], log_every=5)
  assert [d for d, _ in seen] == [2, 4, 6]
  # The hook's parameters at step 6 are the loop's result; its metric joins exactly the rows of its steps.
  jax.tree.map(np.testing.assert_array_equal, seen[-1][1], jax.tree.map(np.asarray, result.params))
  assert [r["step"] for r in result.history if "eval_embed_norm" in r] == [2, 4, 6]
  assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5, 6]
  rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
  assert rows[3]["eval_embed_norm"] == result.history[3]["eval_embed_norm"]


def test_one_and_eight_devices_give_the_same_loss_curve(tmp_path):
  cfg = config_lib.tiny()
  params = transformer.init_params(cfg, jax.random.key(0))
  one = run_loop(cfg, params, sharding.make_mesh({"data": 1}, jax.devices()[:1]), str(tmp_path / "one"), accum=2)
  eight = run_loop(cfg, params, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), str(tmp_path / "eight"),
                   accum=2)
  a, b = [h["loss"] for h in one.history], [h["loss"] for h in eight.history]
  assert len(a) == 6 and a[-1] < a[0]
  # 8 devices reduce the gradient over shards in another order: float32 losses of ~5 drift apart by ~1e-6 a step
  # through Adam, 6 steps: 2e-5 relative (~170 ulps) bounds it.
  np.testing.assert_allclose(a, b, rtol=2e-5)


def _cli_command(workdir, *overrides):
  return [sys.executable, "-m", "bar_jax.train", "--config=configs/train_lm.py:tiny", f"--workdir={workdir}",
          *overrides]


def _cli(workdir, *overrides, env=None):
  """(command, environment); by default conftest's XLA_FLAGS: 8 simulated devices."""
  return _cli_command(workdir, *overrides), env or dict(os.environ, JAX_PLATFORMS="cpu")


def test_kill_9_and_restart_resumes_bit_identical(tmp_path):
  """On one device, the five runs sharing one compilation (sharded checkpoints restored across layouts:
  tests/test_multihost.py)."""
  n = 8  # killed at the first checkpoint (step 2), so 6 steps remain to resume
  steps = [f"--config.phases.midtrain.steps={n}", "--config.phases.midtrain.checkpoint_every=2"]
  one = one_device_env(tmp_path / "jax_cache")
  cmd, env = _cli(tmp_path / "full", *steps, env=one)
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)

  cmd, env = _cli(tmp_path / "killed", *steps, env=one)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = tmp_path / "killed" / "phases" / "midtrain" / "checkpoints"
  killed_at = kill_at_first_checkpoint(proc, ckpts)
  # The kill landed between the first checkpoint and the last: the restart has to resume, not start or skip.
  assert 0 < killed_at < n, f"kill landed at checkpoint {killed_at} of {n}"
  assert not artifact.is_complete(str(tmp_path / "killed"))
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)

  full, resumed = artifact.read_manifest(str(tmp_path / "full")), artifact.read_manifest(str(tmp_path / "killed"))
  assert full["leaf_fingerprints"] == resumed["leaf_fingerprints"]
  rows = [json.loads(l) for l in open(tmp_path / "killed" / "phases" / "midtrain" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, n + 1))
  # Finished: the checkpoints are gone (keep_checkpoints=False), the metrics stay; no run-time knob in the manifest
  # outside `model` (ModelConfig's own fields).
  assert not ckpts.exists()
  manifest_keys = set(walk_keys({k: v for k, v in resumed.items() if k != "model"}))
  assert not manifest_keys & stage_configs.RUNTIME_KEYS, manifest_keys & stage_configs.RUNTIME_KEYS

  # The workdir contract through the CLI: a run-time knob reuses the artifact, anything else is one error line.
  cmd, env = _cli(tmp_path / "killed", *steps, "--config.compute.remat=full", env=one)
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
  assert artifact.read_manifest(str(tmp_path / "killed"))["created"] == resumed["created"]
  cmd, env = _cli(tmp_path / "killed", *steps, "--config.phases.midtrain.opt.lr=0.5", env=one)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
  assert "phases.midtrain.opt.lr" in out.stderr and "another train_lm run" in out.stderr


def test_unknown_config_key_is_one_line(tmp_path):
  cmd, env = _cli(tmp_path / "w", "--config.phases.midtrain.stepz=3")
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 2
  assert out.stderr.strip().count("\n") == 0 and "stepz" in out.stderr
  assert not (tmp_path / "w").exists()


def _tiny_lm_config():
  from configs import train_lm
  return train_lm.get_config("tiny")


def test_mesh_that_does_not_divide_the_devices(tmp_path):
  c = _tiny_lm_config()
  c.mesh = ml_collections.ConfigDict({"data": 3})
  with pytest.raises(BarError, match="needs 3 devices but 8"):
    train.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_missing_model_and_corrupt_artifact(tmp_path):
  c = _tiny_lm_config()
  c.base = str(tmp_path / "nope")
  with pytest.raises(BarError, match="neither an artifact directory"):
    train.run(c, str(tmp_path / "w"))
  params = transformer.init_params(config_lib.tiny(), jax.random.key(0))
  from bar_jax.io import gguf
  art = str(tmp_path / "art")
  artifact.write(art, jax.tree.map(np.asarray, params), {"kind": "dense", "model": config_lib.tiny().to_dict()},
                 gguf.load_tokenizer())
  manifest = json.load(open(os.path.join(art, "manifest.json")))
  manifest["leaf_fingerprints"]["embed/embedding"] = "0" * 64
  json.dump(manifest, open(os.path.join(art, "manifest.json"), "w"))
  c.base = art
  with pytest.raises(BarError, match="embed/embedding"):
    train.run(c, str(tmp_path / "w2"))
  assert not (tmp_path / "w2").exists()


def test_workdir_of_another_run_is_refused_and_kept(tmp_path):
  cfg = config_lib.tiny()
  params = transformer.init_params(cfg, jax.random.key(0))
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  wd = str(tmp_path / "w")
  run_loop(cfg, params, mesh, wd, steps=2)
  before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  part = freeze.make_partition(params, cfg, [r".*"])
  with pytest.raises(BarError, match="another run"):
    loop.train(params=params, cfg=cfg, part=part, loss_fn=loop.lm_loss(cfg), batches=SyntheticBatches(),
               opt=opt(), steps=2, workdir=wd, mesh=mesh, identity={"test": 2})
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before
