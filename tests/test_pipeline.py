"""The whole BAR pipeline on the tiny random model: killed part-way (kill -9 after the first branch is written),
started again with the same command, and checked: every artifact, the lineage chain, the table."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bar_jax import config_files, stage_configs
from bar_jax.errors import BarError
from bar_jax.model.config import COMPUTE_KEYS
from bar_jax.stages import pipeline, progress
from tests.run_helpers import one_device_env, walk_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two branches and two eval domains (one generated, one NLL) keep it short: the chain, not the table's width, is
# what this test checks (every domain's scoring: tests/test_evals.py, tests/test_capabilities.py).
DOMAINS = ["math", "tool_use"]
EVAL_DOMAINS = ["math", "code"]
CMD = [sys.executable, "-m", "bar_jax.train", "--config=configs/bar_smollm2.py:tiny",
       "--config.domains=" + ",".join(DOMAINS), "--config.eval.domains=" + ",".join(EVAL_DOMAINS)]
# The pipeline subprocesses run on one CPU device: 8 simulated devices add cross-thread collectives that XLA aborts
# when a busy machine starves a device thread (seen at load 20 on 2 cores); sharding is covered by other tests.
ENV = one_device_env()


def _manifest(d):
  with open(os.path.join(d, "manifest.json")) as f:
    return json.load(f)


def _params_bytes(d):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(d, "params")) for f in fs)


def test_killed_pipeline_resumes_and_chains(tmp_path):
  work = str(tmp_path / "bar")
  first = os.path.join(work, "branch_math")
  proc = subprocess.Popen(CMD + [f"--workdir={work}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=ENV)
  deadline = time.time() + 900
  while not os.path.isfile(os.path.join(first, "manifest.json")):
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    assert time.time() < deadline, "no branch artifact within the deadline"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)  # mid-way through branch_tool_use at the latest
  proc.wait()
  assert not os.path.exists(os.path.join(work, "merged"))
  fp_first = _manifest(first)["fingerprint"]

  out = subprocess.run(CMD + [f"--workdir={work}"], cwd=ROOT, capture_output=True, text=True,
                       env=ENV, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "base: done, skipped" in out.stdout and "branch_math: done, skipped" in out.stdout

  domains = DOMAINS
  base = _manifest(os.path.join(work, "base"))
  branches = {d: _manifest(os.path.join(work, f"branch_{d}")) for d in domains}
  assert branches["math"]["fingerprint"] == fp_first  # the finished step was not redone
  for d, m in branches.items():
    assert m["kind"] == "branch" and m["domain"] == d
    assert m["base_fingerprint"] == base["fingerprint"]
    assert [(p["fingerprint"], p["role"]) for p in m["parents"]] == [(base["fingerprint"], "base")]
    # Stored over the base: only what training changed (the anchor and the frozen leaves are the base's).
    assert m["over_base"]["fingerprint"] == base["fingerprint"] and m["over_base"]["path"] == "../base"
    assert "layers/attn/q/kernel" in m["over_base"]["leaves"]
    sizes = {n: _params_bytes(os.path.join(work, n)) for n in ("base", f"branch_{d}")}
    print(f"params bytes: {sizes}")
    assert sizes[f"branch_{d}"] < sizes["base"]
  merged_dir = os.path.join(work, "merged")
  merged = _manifest(merged_dir)
  assert merged["kind"] == "moe" and merged["experts"] == ["anchor"] + domains
  assert merged["base_fingerprint"] == base["fingerprint"]
  assert [p["fingerprint"] for p in merged["parents"] if p["role"] == "branch"] == \
      [branches[d]["fingerprint"] for d in domains]
  # The ledger counts each branch's training once and the shared base once.
  assert merged["ledger"]["tokens"] == pytest.approx(sum(b["ledger"]["tokens"] for b in branches.values()))
  final = os.path.join(work, "merged")
  if config_files.stage_available("router"):
    routed = _manifest(os.path.join(work, "routed"))
    assert [p["fingerprint"] for p in routed["parents"]] == [merged["fingerprint"]]
    assert routed["ledger"]["tokens"] > merged["ledger"]["tokens"]
    final = os.path.join(work, "routed")

  labels = ["base"] + [f"branch_{d}" for d in domains] + ["bar"]
  dirs = [os.path.join(work, "base")] + [os.path.join(work, f"branch_{d}") for d in domains] + [final]
  for label, d in zip(labels, dirs):
    with open(os.path.join(work, "eval", label, "eval.json")) as f:
      (row,) = json.load(f)["models"]
    assert row["fingerprint"] == _manifest(d)["fingerprint"]  # each row evaluated the artifact it names
  with open(os.path.join(work, "results.md")) as f:
    table = [line for line in f if line.startswith("| ") and not line.startswith("| model")]
  assert [line.split("|")[1].strip() for line in table] == labels
  with open(os.path.join(work, "results.json")) as f:
    rows = json.load(f)["models"]
  assert [r["name"] for r in rows] == labels
  assert all(set(r["domains"]) == set(EVAL_DOMAINS) for r in rows)
  # The architecture is all a manifest records of the model: no run-time compute knob (the branches ran with remat),
  # neither in an artifact's own entry nor in the parents' copies it carries.
  for root, _, files in os.walk(work):
    if "manifest.json" in files:
      m = _manifest(root)
      for entry in [m] + list(m.get("parents", [])):
        assert not set(entry.get("model", {})) & set(COMPUTE_KEYS), (root, sorted(entry.get("model", {})))
  # No manifest carries a run-time knob outside `model` (ModelConfig's own fields).
  for d in dirs + [merged_dir]:
    keys = set(walk_keys({k: v for k, v in _manifest(d).items() if k != "model"}))
    assert not keys & stage_configs.RUNTIME_KEYS, (d, keys & stage_configs.RUNTIME_KEYS)

  # Changed settings: the branches' remat (run-time) is reused, the merge rule is not: merged is redone after its
  # folder is moved aside, and so is every step that reads it; the stale folders are kept.
  old_merged = _manifest(merged_dir)
  out = subprocess.run(CMD + [f"--workdir={work}", "--config.merge.rule=base",
                              "--config.branch.overrides.compute.remat=full"], cwd=ROOT, capture_output=True,
                       text=True, env=ENV, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  for name in ["base"] + [f"branch_{d}" for d in domains] + ["eval/base"]:
    assert f"{name}: done, skipped" in out.stdout, name
  assert "merged: done, skipped" not in out.stdout
  assert _manifest(merged_dir + ".stale")["fingerprint"] == old_merged["fingerprint"]
  new_merged = _manifest(merged_dir)
  assert new_merged["merge_rule"] == "base" and new_merged["identity"]["rule"] == "base"
  with open(os.path.join(work, "eval", "bar", "eval.json")) as f:
    (row,) = json.load(f)["models"]
  assert row["fingerprint"] == _manifest(final)["fingerprint"]  # the table's bar row scored the new model


def test_overrides_reject_unknown_keys():
  with pytest.raises(BarError, match="phases.sft.stepz"):
    config_files.stage_config("branch", "math,tiny", {"phases": {"sft": {"stepz": 3}}})
  c = config_files.stage_config("branch", "math,tiny", {"phases.sft.steps": 3, "general_ratio": 0.5})
  assert (c.phases.sft.steps, c.general_ratio) == (3, 0.5)


def test_an_eval_of_another_model_is_redone_not_reused(tmp_path, monkeypatch):
  """E.g. eval/bar scored the merged model, and a later run with router training makes `bar` the routed one."""
  from bar_jax.stages import evaluate
  model, edir = tmp_path / "routed", tmp_path / "eval" / "bar"
  model.mkdir()
  edir.mkdir(parents=True)
  (model / "manifest.json").write_text(json.dumps({"fingerprint": "old"}))
  step = pipeline.Step("eval/bar", "eval", str(edir), pipeline.eval_config(
      config_files.stage_config("bar_smollm2", "tiny"), str(model)), result_file="eval.json")
  (edir / "eval.json").write_text(json.dumps({"identity": step.identity(), "models": [{"fingerprint": "old"}]}))
  (edir / "eval.md").write_text("old table")
  assert step.done()
  (model / "manifest.json").write_text(json.dumps({"fingerprint": "new"}))  # the artifact there now is another
  assert not step.done()
  ran = []
  monkeypatch.setattr(evaluate, "run", lambda config, wd: ran.append(os.listdir(wd) if os.path.exists(wd) else []))
  step.run()
  assert ran == [[]]  # the stage found no old files: they were moved aside whole, and kept
  stale = tmp_path / "eval" / "bar.stale"
  assert json.loads((stale / "eval.json").read_text())["models"][0]["fingerprint"] == "old"
  assert (stale / "eval.md").read_text() == "old table"


def _load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_ledger_curves_linear_vs_quadratic():
  ledger = _load("experiments/ledger.py")
  c = ledger.curves([(10.0, 100.0)] * 4, router=(1.0, 10.0), mono_per_domain=(10.0, 80.0))
  assert c["bar_tokens"] == [11.0, 22.0, 33.0, 44.0]
  assert c["mono_tokens"] == [10.0, 30.0, 60.0, 100.0]  # 10 * k(k+1)/2
  assert c["mono_flops"] == [80.0, 240.0, 480.0, 800.0]


def test_first_estimate_comes_from_this_machines_measured_rate(tmp_path, monkeypatch):
  """Before any step has timed itself, a branch's estimate is its model FLOPs over the measured matmul rate (twice
  the rate: half the time); afterwards the rate the finished branch measured replaces it."""
  from bar_jax.model import transformer
  from bar_jax.model.config import tiny
  config = config_files.stage_config("bar_smollm2", "tiny")
  base_cfg = tiny(vocab_size=259)
  base_dir = tmp_path / "base"
  base_dir.mkdir()
  (base_dir / "manifest.json").write_text(json.dumps({"model": base_cfg.to_dict()}))
  steps = {s.kind: s for s in pipeline.plan(config, str(tmp_path))}
  branch = steps["branch"]
  assert branch.train_steps and branch.tokens_per_step

  estimates = {}
  for rate in (1e10, 2e10):
    monkeypatch.setattr(progress, "matmul_flops_per_second", lambda rate=rate: rate)
    clock = progress.Clock(config)
    assert not clock.known()
    clock.observe(steps["base"], 0.0, str(tmp_path))
    assert clock.known()
    estimates[rate] = clock.estimate(branch) - config.estimate.other_seconds
  flops = transformer.train_flops_per_token(base_cfg.replace(ffn="moe", n_experts=2, top_k=0),
                                            branch.tokens_per_step)
  expected = branch.train_steps * branch.tokens_per_step * flops / (1e10 * config.estimate.fraction_of_peak)
  assert estimates[1e10] == pytest.approx(expected, rel=1e-9)
  assert estimates[2e10] == pytest.approx(expected / 2, rel=1e-9)
  # A finished branch's own rate wins.
  os.makedirs(branch.outdir)
  with open(os.path.join(branch.outdir, "manifest.json"), "w") as f:
    json.dump({"stages": [{"seconds": 30.0, "tokens": 3000}]}, f)
  clock.observe(branch, 0.0, str(tmp_path))
  assert clock.estimate(branch) == pytest.approx(
      branch.train_steps * branch.tokens_per_step * 0.01 + config.estimate.other_seconds)
  monkeypatch.undo()
  assert 1e6 < progress.matmul_flops_per_second(n=256, repeats=2) < 1e16  # the real measurement: a finite rate
