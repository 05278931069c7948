"""kill -9 at random points of a pipeline run, then the same command again: every artifact must come out with the
fingerprints of an uninterrupted run, and the table with the same scores, with no manual step in between.

  nice -n 10 python experiments/kill9_pipeline.py --workdir=/tmp/kill9                      # 5 kills, :tiny
  nice -n 10 python experiments/kill9_pipeline.py --workdir=/tmp/kill9 --reference=DIR --reference_seconds=S

For each kill i: start the pipeline into WORKDIR/killed_<i> (its own process group), wait a random time drawn from
[3%, 90%] of the reference's wall time (seeded), SIGKILL the group, note which pipeline step was running, then run
the identical command to completion. A kill that comes after the run has already finished is retried at half the
delay. Writes WORKDIR/kill9.json and prints one row per kill; exit status 1 if any fingerprint or score differs.
All runs share one compilation cache (WORKDIR/jax_cache, or the reference's), which changes no result.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = re.compile(r"^(base|branch_.*|merged|routed)$")


def command(config: str, workdir: str, cache: str) -> list[str]:
  return [sys.executable, "-m", "bar_jax.train", f"--config={config}", f"--workdir={workdir}",
          f"--config.compilation_cache={cache}"]


def run_to_end(cmd: list[str], log: str) -> tuple[int, float]:
  t0 = time.time()
  with open(log, "a") as f:
    rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
  return rc, time.time() - t0


def run_and_kill(cmd: list[str], delay: float, log: str) -> tuple[bool, str]:
  """(killed, the pipeline step that was running when the kill landed)."""
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
      proc.wait(timeout=delay)
      return False, "finished"
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  with open(log, errors="replace") as f:
    running = re.findall(r"\[pipeline (\d+/\d+)\] (\S+): running", f.read())
  return True, (f"{running[-1][1]} ({running[-1][0]})" if running else "before the first step")


def outcome(workdir: str) -> dict:
  """{artifact: fingerprint} and the table's scores (timing fields left out)."""
  fps = {}
  for name in sorted(os.listdir(workdir)):
    if ARTIFACTS.match(name) and os.path.isfile(os.path.join(workdir, name, "manifest.json")):
      with open(os.path.join(workdir, name, "manifest.json")) as f:
        fps[name] = json.load(f)["fingerprint"]
  scores = None
  path = os.path.join(workdir, "results.json")
  if os.path.isfile(path):
    with open(path) as f:
      models = json.load(f)["models"]
    scores = {m["name"]: {d: {k: v for k, v in r.items() if "second" not in k and "time" not in k}
                          for d, r in m.get("domains", {}).items()} for m in models}
  return {"fingerprints": fps, "scores": scores}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--config", default="configs/bar_smollm2.py:tiny")
  ap.add_argument("--kills", type=int, default=5)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--reference", default="", help="a finished uninterrupted run of the same config to compare to")
  ap.add_argument("--reference_seconds", type=float, default=300.0, help="its wall time (kill delays scale with it)")
  args = ap.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  rng = random.Random(args.seed)
  ref = args.reference or os.path.join(args.workdir, "reference")
  cache = os.path.join(ref, "jax_cache") if args.reference else os.path.join(args.workdir, "jax_cache")
  ref_seconds = None
  if not args.reference:
    rc, ref_seconds = run_to_end(command(args.config, ref, cache), os.path.join(args.workdir, "reference.log"))
    if rc:
      print(f"reference run failed (exit {rc}); see {args.workdir}/reference.log")
      return 1
  want = outcome(ref)
  if ref_seconds is None:
    ref_seconds = args.reference_seconds
  rows, ok = [], True
  for i in range(args.kills):
    wd = os.path.join(args.workdir, f"killed_{i}")
    cmd = command(args.config, wd, cache)
    delay = rng.uniform(0.03, 0.9) * ref_seconds
    killed, at = run_and_kill(cmd, delay, os.path.join(args.workdir, f"killed_{i}.log"))
    while not killed and delay > 1:  # the warm cache made it finish first: kill the next try sooner
      shutil.rmtree(wd)
      delay /= 2
      killed, at = run_and_kill(cmd, delay, os.path.join(args.workdir, f"killed_{i}.log"))
    leftovers = sorted(n for n in os.listdir(wd) if n.startswith(".")) if os.path.isdir(wd) else []
    rc, resume_s = run_to_end(cmd, os.path.join(args.workdir, f"killed_{i}.resume.log"))
    got = outcome(wd)
    same = rc == 0 and got == want
    ok &= same
    rows.append({"kill": i, "delay_s": round(delay, 1), "running": at, "hidden_leftovers": leftovers,
                 "resume_exit": rc, "resume_s": round(resume_s, 1), "same_fingerprints": got["fingerprints"] ==
                 want["fingerprints"], "same_scores": got["scores"] == want["scores"]})
    print(json.dumps(rows[-1]), flush=True)
  with open(os.path.join(args.workdir, "kill9.json"), "w") as f:
    json.dump({"config": args.config, "reference": ref, "reference_fingerprints": want["fingerprints"],
               "kills": rows, "all_same": ok}, f, indent=1)
  print(f"{sum(r['same_fingerprints'] and r['same_scores'] for r in rows)}/{len(rows)} kills recovered to the "
        f"reference's fingerprints and scores")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
