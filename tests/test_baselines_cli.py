"""experiments/run_baselines.py through its command line on the tiny random model: every baseline (monolithic,
sequential, dense_merge, btx) writes a valid artifact; the same command again recomputes nothing; a changed setting
recomputes only what it changes (the old folder moved aside, kept)."""
import json
import os
import subprocess
import sys

import numpy as np

from bar_jax.io import artifact
from bar_jax.pytree import flatten
from tests.run_helpers import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two domains whose data reads fast and one generated eval domain keep the run near a minute on 2 cores; the
# scoring of every domain is tests/test_evals.py's job.
DOMAINS = ["math", "tool_use"]


def _run(work, *extra):
  cmd = [sys.executable, "experiments/run_baselines.py", "--variant=tiny", "--bar=false", "--eval_domains=math",
         f"--workdir={work}/w", f"--results={work}/results", *extra]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=one_device_env(), timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return [line for line in out.stdout.splitlines() if line.startswith("[baselines]")]


def _stamps(w):
  """manifest.json / eval.json of every output, with their modification times."""
  return {os.path.relpath(os.path.join(r, f), w): os.stat(os.path.join(r, f)).st_mtime_ns
          for r, _, fs in os.walk(w) for f in fs if f in ("manifest.json", "eval.json")}


def test_every_baseline_runs_from_the_command_line_and_resumes(tmp_path):
  work = str(tmp_path)
  w = os.path.join(work, "w")
  lines = _run(work, "--domains=" + ",".join(DOMAINS))
  ran = [line.split()[1].rstrip(":") for line in lines if line.endswith(": running")]
  assert ran[:7] == ["base", "monolithic", "dense_math", "dense_tool_use", "sequential_2_tool_use", "dense_merge",
                     "btx_merged"] and "btx" in ran

  arts = {n: artifact.read(os.path.join(w, n)) for n in ("base", "monolithic", "dense_math", "dense_tool_use",
                                                         "sequential_2_tool_use", "dense_merge", "btx_merged", "btx")}
  fp = {n: a.fingerprint for n, a in arts.items()}
  for n, a in arts.items():  # every artifact verified against its fingerprints and carrying its identity
    assert a.manifest["identity"], n
  assert arts["monolithic"].manifest["kind"] == "dense" and arts["monolithic"].manifest["domain"] == "all"
  # Sequential: step 2 trains from step 1, the first domain's dense fine-tune.
  assert [p["fingerprint"] for p in arts["sequential_2_tool_use"].manifest["parents"]] == [fp["dense_math"]]
  # Dense merge: the float64 mean of the two fine-tunes, rounded once, leaf by leaf.
  fine = [flatten(arts[f"dense_{d}"].params) for d in DOMAINS]
  merged = flatten(arts["dense_merge"].params)
  assert set(merged) == set(fine[0])
  for path, leaf in merged.items():
    want = ((np.asarray(fine[0][path], np.float64) + np.asarray(fine[1][path], np.float64)) / 2).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(leaf), want, err_msg=path)
  assert [p["fingerprint"] for p in arts["dense_merge"].manifest["parents"]] == [fp[f"dense_{d}"] for d in DOMAINS]
  # BTX: anchor = the base FFN, expert i = fine-tune i's FFN; then only the router trained.
  btx = arts["btx_merged"]
  assert btx.manifest["kind"] == "moe" and btx.manifest["experts"] == ["anchor"] + DOMAINS
  base = arts["base"].params
  for wname in ("gate", "up", "down"):
    ex = np.asarray(btx.params["layers"]["moe"]["experts"][wname])
    for i, src in enumerate([base] + [arts[f"dense_{d}"].params for d in DOMAINS]):
      np.testing.assert_array_equal(ex[:, i], np.asarray(src["layers"]["mlp"][wname]["kernel"]))
  routed = arts["btx"].manifest
  assert [p["fingerprint"] for p in routed["parents"]] == [fp["btx_merged"]]
  changed = {p for p, f in routed["leaf_fingerprints"].items() if btx.manifest["leaf_fingerprints"][p] != f}
  assert changed == {"layers/moe/router/kernel"}
  with open(os.path.join(work, "results", "baselines_tiny.json")) as f:
    rows = [r["name"] for r in json.load(f)["rows"]]
  assert rows == ["base", "monolithic", "sequential_1_math", "sequential_2_tool_use", "dense_merge", "btx"]

  # The same command again: every step found finished under its identity, nothing written.
  before = _stamps(w)
  lines = _run(work, "--domains=" + ",".join(DOMAINS))
  assert lines and all(line.endswith("done, skipped") for line in lines), lines
  assert _stamps(w) == before

  # One setting changed (dense_merge over math alone): that merge and its eval are redone, the old merge kept aside;
  # the base, the math fine-tune and the base's eval are reused.
  lines = _run(work, "--domains=math", "--only=dense_merge")
  ran = sorted(line.split()[1].rstrip(":") for line in lines if line.endswith(": running"))
  assert ran == ["dense_merge", "eval/dense_merge"], lines
  assert artifact.read_manifest(os.path.join(w, "dense_merge.stale"))["fingerprint"] == fp["dense_merge"]
  assert artifact.read_manifest(os.path.join(w, "dense_merge"))["parents"][0]["fingerprint"] == fp["dense_math"]
  assert _stamps(w)["dense_math/manifest.json"] == before["dense_math/manifest.json"]
