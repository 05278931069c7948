"""Nothing silent: bad settings, bad numbers and operating-system failures each stop with one line (exit 2), killed
writes recover by re-running, and every run records what it did. One test (or more) per kind."""
import errno
import json
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from bar_jax import errors, guards, invocation, preflight, sharding, stage_configs, train
from bar_jax.errors import BarError
from bar_jax.io import artifact, checkpoint
from bar_jax.model import config as config_lib, transformer
from bar_jax.stages import loop
from configs.common import opt_defaults
from bar_jax.transforms import freeze

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def cli(*args, module="bar_jax.train"):
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True)
  return out.returncode, out.stderr.strip()


def one_line(stderr: str) -> str:
  assert stderr.startswith("error: ") and "\n" not in stderr, stderr[-2000:]
  return stderr


def strict_json(line: str):
  """json.loads that refuses NaN/Infinity (Python's accepts them; JSON does not)."""
  return json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {line!r}"))


# ----------------------------------------------------------------------------------------------------------------
# 1. Settings are checked before any work starts.

def _tiny_lm_config():
  from configs import train_lm
  return train_lm.get_config("tiny")


@pytest.mark.parametrize("key, value, match", [
    ("steps", -3, r"config.phases.midtrain.steps=-3 is invalid: it must be an integer >= 1"),
    ("lr", -1e-3, r"opt.lr=-0.001 is invalid"),
    ("batch_size", 0, r"batch_size=0 is invalid"),
    ("seq_len", 1, r"seq_len=1 is invalid"),
])
def test_out_of_range_settings_stop_before_any_work(tmp_path, key, value, match):
  c = _tiny_lm_config()
  phase = c.phases.midtrain
  (phase.opt if key == "lr" else phase.data if key == "seq_len" else phase)[key] = value
  with pytest.raises(BarError, match=match):
    train.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_sampling_knobs_and_top_k_against_the_experts(tmp_path):
  from configs import merge
  c = merge.get_config()
  c.branches = f"{tmp_path}/a,{tmp_path}/b"  # need not exist: the check comes first
  c.moe.top_k = 9
  with pytest.raises(BarError, match="top_k=9 is more than the merged model's 3 experts"):
    train.run(c, str(tmp_path / "moe"))
  from configs import rl
  for key, value, match in (("top_p", 2.0, r"config.rl.top_p=2.0 is invalid: it must be a number in \(0, 1\]"),
                            ("temperature", -1.0, "config.rl.temperature=-1.0 is invalid"),
                            ("steps", 2.5, "config.rl.steps=2.5 is invalid: it must be an integer")):
    c = rl.get_config("math")
    c.rl.unlock()
    del c.rl[key]
    c.rl[key] = value
    with pytest.raises(BarError, match=match):
      stage_configs.load(c)


def test_pipeline_domains_are_checked_before_the_first_branch(tmp_path):
  from configs import bar_smollm2
  for domains, match in ((["math", "bogus"], "unknown domain 'bogus'"), (["math", "math"], "math more than once")):
    c = bar_smollm2.get_config("tiny")
    c.domains = domains
    with pytest.raises(BarError, match=match):
      train.run(c, str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()  # nothing ran: no base, no branch


def test_list_settings_take_comma_lists_on_the_command_line(tmp_path):
  code, err = cli("--config=configs/bar_smollm2.py:tiny", f"--workdir={tmp_path}/p", "--config.domains=math,math")
  assert code == 2 and "config.domains lists math more than once" in one_line(err)
  code, err = cli("--config=configs/bar_smollm2.py:tiny", f"--workdir={tmp_path}/p", "--config.domains=math,code",
                  "--config.merge.moe.top_k=4")  # two domains reached the config: anchor + 2 experts
  assert code == 2 and "top_k=4 is more than the merged model's 3 experts" in one_line(err)
  from configs import branch
  argv, lists = train._list_overrides(["x", "--config.phase_order=midtrain,sft,rl", "--config.seed=3",
                                       "--config.frozen_experts=0,1"], branch.get_config("math,tiny"))
  assert argv == ["x", "--config.seed=3"]
  assert lists == [("phase_order", ["midtrain", "sft", "rl"]), ("frozen_experts", [0, 1])]


def test_every_documented_branch_variant_has_sft_examples_that_fit(smollm2_tokenizer):
  from bar_jax.data import capability
  from configs import branch
  c = branch.get_config("tool_use,tiny")
  chats = capability.get("tool_use").chat_examples("train")[:64]
  lengths = [len(smollm2_tokenizer.render_chat(m)[0]) for m in chats]
  assert sum(n <= c.phases.sft.data.seq_len for n in lengths) >= len(lengths) // 2


# ----------------------------------------------------------------------------------------------------------------
# 2. Numbers that go bad stop the run.

def test_loss_guard_non_finite_and_divergence():
  g = guards.LossGuard(factor=10.0)
  for step, loss in enumerate([11.0, 10.5, 10.0, 9.5], 1):
    g.check({"step": step, "loss": loss, "grad_norm": 1.0})
  with pytest.raises(BarError, match=r"loss 1.1e\+09 at step 5 is over 10x its running level"):
    g.check({"step": 5, "loss": 1.1e9, "grad_norm": 1.0})
  with pytest.raises(BarError, match="grad_norm is inf at step 2"):
    guards.LossGuard().check({"step": 2, "loss": 3.0, "grad_norm": float("inf")})
  with pytest.raises(BarError, match="loss is nan at step 1"):
    guards.LossGuard().check({"step": 1, "loss": float("nan")})


class Batches:
  """Random token batches with get_state/set_state; the batch of step `nan_at` carries a NaN loss weight (a stand-in
  for any bad number: a damaged input, an overflow)."""

  def __init__(self, cfg, nan_at=0):
    self.i, self.cfg, self.nan_at = 0, cfg, nan_at

  def __next__(self):
    rng = np.random.default_rng(self.i)
    self.i += 1
    x = rng.integers(0, self.cfg.vocab_size, (4, 17)).astype(np.int32)
    mask = np.ones((4, 16), np.float32)
    if self.i == self.nan_at:
      mask[0, 0] = np.nan
    return {"inputs": x[:, :-1], "targets": x[:, 1:], "mask": mask,
            "segment_ids": np.ones((4, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1))}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def _train(workdir, lr, steps, checkpoint_every=2, nan_at=0):
  cfg = config_lib.tiny()
  params = transformer.init_params(cfg, jax.random.key(0))
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  part = freeze.make_partition(params, cfg, [r".*"])
  it = Batches(cfg, nan_at)
  return loop.train(params=params, cfg=cfg, part=part, loss_fn=loop.lm_loss(cfg), batches=it,
                    opt=opt_defaults(lr=lr, warmup_steps=0, schedule="constant", clip_norm=0.0),
                    steps=steps, workdir=workdir, mesh=mesh, identity={"lr": lr}, checkpoint_every=checkpoint_every,
                    log_every=1, data_iter=it)


def test_a_nan_loss_stops_the_run_keeps_the_last_good_checkpoint_and_writes_valid_json(tmp_path, capsys):
  wd = str(tmp_path / "w")
  try:
    _train(wd, lr=1e-3, steps=6, nan_at=5)
    raise AssertionError("the NaN loss did not stop the run")
  except BarError as e:
    assert re.search(r"train: loss is nan at step 5; nothing from this step was saved", str(e)), str(e)
    # Read while the error is still propagating (where the CLI prints it): the progress bar has already ended its
    # line, so the error starts a line of its own.
    err = capsys.readouterr().err
  assert "train:" in err and err.endswith("\n"), repr(err[-200:])
  rows = [strict_json(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss"] is None
  assert sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit()) == [2, 4]


def test_metrics_rows_are_json_and_tensorboard_is_flushed_at_checkpoints(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  w = loop.MetricsWriter(str(tmp_path), path, [])
  w.log({"step": 1, "loss": float("nan"), "grad_norm": 2.0})
  (line,) = open(path).read().splitlines()
  assert strict_json(line)["loss"] is None
  events = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "tensorboard") for f in fs]
  before = sum(os.path.getsize(e) for e in events)
  w.flush()
  assert sum(os.path.getsize(e) for e in events) > before  # the scalars are on disk before close()
  w.end()


def test_resumed_stage_adds_up_its_seconds(tmp_path, monkeypatch):
  wd = str(tmp_path / "w")
  clock = iter(range(0, 10**9, 1000))  # the first process: 1000 s between time() calls
  monkeypatch.setattr(loop, "time", types.SimpleNamespace(time=lambda: float(next(clock))))  # loop's clock only
  first = _train(wd, lr=1e-3, steps=2)
  monkeypatch.undo()
  second = _train(wd, lr=1e-3, steps=4)  # resumes at step 2
  assert first.seconds >= 1000 and second.seconds > first.history[-1]["elapsed"] >= 1000
  assert [r["elapsed"] for r in second.history] == sorted(r["elapsed"] for r in second.history)


def test_non_finite_artifact_is_never_written_or_accepted(tmp_path, smollm2_tokenizer, monkeypatch):
  cfg = config_lib.tiny()
  params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(0)))
  params["embed"]["embedding"] = params["embed"]["embedding"].copy()
  params["embed"]["embedding"][0, :5] = np.nan
  with pytest.raises(BarError, match="leaf embed/embedding holds 5 NaN/Inf"):
    artifact.write(str(tmp_path / "a"), params, {"kind": "dense", "model": cfg.to_dict()}, smollm2_tokenizer)
  assert os.listdir(tmp_path) == []
  monkeypatch.setattr(artifact, "check_finite", lambda *a: None)  # an artifact written before this check existed
  artifact.write(str(tmp_path / "a"), params, {"kind": "dense", "model": cfg.to_dict()}, smollm2_tokenizer)
  monkeypatch.undo()
  with pytest.raises(BarError, match="fails verification.*embed/embedding holds 5 NaN"):
    artifact.read(str(tmp_path / "a"))
  with pytest.raises(BarError, match="embed/embedding holds 5 NaN"):
    artifact.open_params(str(tmp_path / "a"))["embed/embedding"]


def _flip(path: str) -> None:
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(min(8, len(data))):
      data[len(data) // 2 + i - 4] ^= 0xFF
    f.seek(0)
    f.write(data)


def test_damaged_checkpoint_is_refused_or_falls_back_when_asked(tmp_path):
  d = str(tmp_path / "checkpoints")
  ck = checkpoint.Checkpointer(d)
  for step in (2, 4):
    ck.save(step, {"w": np.full(64, float(step), np.float32)})
  ck.close()
  state = os.path.join(d, "4", "state")
  biggest = max((os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs), key=os.path.getsize)
  _flip(biggest)
  with pytest.raises(BarError, match=r"checkpoint .*/4 is damaged .* changed since it was written.*"
                                     r"--checkpoint_fallback to resume from the previous good step \(2\)"):
    checkpoint.Checkpointer(d).latest_step()
  ck = checkpoint.Checkpointer(d, fallback=True)
  assert ck.latest_step() == 2
  assert os.path.isdir(os.path.join(d + ".damaged", "4"))  # kept aside, not deleted
  restored = ck.restore(2, {"w": jax.ShapeDtypeStruct((64,), np.float32)})
  np.testing.assert_array_equal(restored["w"], np.full(64, 2.0, np.float32))
  ck.close()


def test_the_cli_fallback_flag_reaches_a_stages_checkpoints(tmp_path, monkeypatch):
  """--checkpoint_fallback sets the stage config's checkpoint_fallback, which reaches the stage's Checkpointer: a
  train_lm run stopped after its step-4 checkpoint, that step damaged, is refused by the same command without the flag
  and resumed from step 2 with it."""
  config = _tiny_lm_config()
  config.phases.midtrain.steps, config.phases.midtrain.checkpoint_every = 6, 2
  wd = str(tmp_path / "lm")

  class Stop(Exception):
    pass

  save = checkpoint.Checkpointer.save

  def save_then_stop(self, step, *a, **k):
    save(self, step, *a, **k)
    if step == 4:
      raise Stop  # a run killed after its step-4 checkpoint

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_stop)
  with pytest.raises(Stop):
    train.run(config, wd)
  monkeypatch.undo()
  ckpts = os.path.join(wd, "phases", "midtrain", "checkpoints")
  state = os.path.join(ckpts, "4", "state")
  _flip(max((os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs), key=os.path.getsize))
  argv = [sys.executable, "-m", "bar_jax.train", "--config=configs/train_lm.py:tiny", f"--workdir={wd}",
          "--config.phases.midtrain.steps=6", "--config.phases.midtrain.checkpoint_every=2"]
  refused = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True)
  assert refused.returncode == 2 and re.search(r"checkpoint .*/4 is damaged .*--checkpoint_fallback to resume from "
                                               r"the previous good step \(2\)", one_line(refused.stderr.strip()))
  resumed = subprocess.run(argv + ["--checkpoint_fallback"], cwd=REPO, env=ENV, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert re.search(r"/4 is damaged .*resuming from 2", resumed.stdout), resumed.stdout[-2000:]
  assert os.path.isdir(os.path.join(ckpts + ".damaged", "4"))
  assert artifact.read_manifest(wd)["stages"][0]["steps"] == 6


# ----------------------------------------------------------------------------------------------------------------
# 3. Operating-system failures are one line.

def test_workdir_that_is_a_file_unwritable_or_on_a_full_disk(tmp_path, monkeypatch):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(BarError, match="is a file, not a directory"):
    preflight.check_workdir(str(f))
  with pytest.raises(BarError, match="cannot be created"):
    preflight.check_workdir(str(f / "sub"))

  def read_only(*a, **k):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
  monkeypatch.setattr(preflight.tempfile, "mkstemp", read_only)
  with pytest.raises(BarError, match="is not writable: Read-only file system"):
    preflight.check_workdir(str(tmp_path))
  monkeypatch.undo()
  monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * 2**20})())
  with pytest.raises(BarError, match="only 10 MiB free"):
    preflight.check_workdir(str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: type("U", (), {"free": 2**20})())
  with pytest.raises(BarError, match=r"no room for checkpoint step 2: it needs ~5 MiB, 1 MiB are free"):
    ck.save(2, {"w": np.zeros(2**20, np.float32)})  # 4 MiB of state
  monkeypatch.undo()
  assert ck.latest_step() is None
  ck.close()


def test_merge_checks_its_workdir_before_reading_a_leaf(tmp_path):
  from configs import merge
  c = merge.get_config()
  c.branches = f"{tmp_path}/a,{tmp_path}/b"  # missing: reading them would fail with another message
  (tmp_path / "moe").write_text("a file")
  with pytest.raises(BarError, match="is a file, not a directory"):
    train.run(c, str(tmp_path / "moe"))


def test_os_failures_deep_in_a_library_become_one_line():
  try:
    try:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/checkpoints/4")
    except OSError as e:
      raise RuntimeError("orbax: async save failed") from e
  except RuntimeError as e:
    line = errors.os_failure(e)
  assert line.startswith("No space left on device at /w/checkpoints/4; free disk space")
  assert "read-only" in errors.os_failure(ValueError("tensorstore: Read-only file system [path=/x]"))
  assert errors.os_failure(ValueError("a bug")) is None


def test_config_file_errors_and_missing_flags_are_one_line(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import ml_collections\n\ndef get_config(:\n  pass\n")
  code, err = cli(f"--config={bad}", f"--workdir={tmp_path}/w")
  assert code == 2 and f"{bad}:3: SyntaxError" in one_line(err)
  bad.write_text("import ml_collections\n\n\ndef get_config():\n  return ml_collections.ConfigDict(x=undefined)\n")
  code, err = cli(f"--config={bad}", f"--workdir={tmp_path}/w")
  assert code == 2 and f"{bad}:5: NameError: name 'undefined' is not defined" in one_line(err)
  code, err = cli("--config=configs/bar_smollm2.py:bogus", f"--workdir={tmp_path}/w")
  assert code == 2 and "bar_smollm2.py:" in one_line(err) and "variant='bogus'" in err
  code, err = cli(f"--workdir={tmp_path}/w")
  assert code == 2 and "--config is required" in one_line(err)
  code, err = cli("--config=configs/train_lm.py:tiny")
  assert code == 2 and "--workdir is required" in one_line(err)
  assert not (tmp_path / "w").exists()


def test_generate_refuses_bad_sampling_and_an_overlong_prompt():
  from bar_jax import generate
  with pytest.raises(BarError, match="--temperature=-1.0 must be >= 0"):
    generate.complete("tiny", "hi", temperature=-1.0)
  with pytest.raises(BarError, match=r"--top_p=2.0 must be in \(0, 1\]"):
    generate.complete("tiny", "hi", top_p=2.0)
  with pytest.raises(BarError, match="exceeds the model's context of 512 tokens"):
    generate.complete("tiny", "word " * 600, raw=True, max_new_tokens=4)


# ----------------------------------------------------------------------------------------------------------------
# 4. Interrupted writes recover by re-running.

def test_leftovers_of_a_killed_artifact_write_are_cleaned_by_the_next_write(tmp_path, smollm2_tokenizer):
  cfg = config_lib.tiny()
  params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(0)))
  d = tmp_path / "art"
  (d / "params").mkdir(parents=True)                   # killed between the final moves: params, no manifest
  (d / "checkpoints").mkdir()                          # a stage's own files stay
  (tmp_path / ".art.tmp-deadbeef" / "params").mkdir(parents=True)  # killed before the final rename
  fp = artifact.write(str(d), params, {"kind": "dense", "model": cfg.to_dict()}, smollm2_tokenizer)
  assert fp == artifact.fingerprint(params)
  assert sorted(os.listdir(tmp_path)) == ["art"]
  assert (d / "checkpoints").is_dir() and artifact.read(str(d)).fingerprint == fp


# ----------------------------------------------------------------------------------------------------------------
# 5. Every run says what it did.

def test_manifest_records_the_command_and_the_summary_line_reads_it(tmp_path, smollm2_tokenizer):
  cfg = config_lib.tiny()
  params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(0)))
  invocation.record(["python", "-m", "bar_jax.train", "--config=configs/x.py:tiny", "--config.lr=1e-3",
                     "--workdir=out dir"])
  try:
    stages = [{"stage": "sft", "steps": 6, "tokens": 3072.0, "seconds": 2.0, "loss_first": 11.5, "loss_last": 9.25}]
    artifact.write(str(tmp_path / "a"), params, {"kind": "dense", "model": cfg.to_dict(), "stages": stages},
                   smollm2_tokenizer)
  finally:
    invocation.record([])
  m = artifact.read_manifest(str(tmp_path / "a"))
  assert m["command"] == "python -m bar_jax.train --config=configs/x.py:tiny --config.lr=1e-3 '--workdir=out dir'"
  line = train.summary_line(str(tmp_path / "a"))
  assert line.startswith("dense artifact, 6 steps, 3,072 tokens, loss 11.5000 -> 9.2500, 2.0 s training "
                         "(1,536 tokens/s), fingerprint " + m["fingerprint"][:16])
  assert line.endswith("MiB params")
