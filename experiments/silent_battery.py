"""The "nothing silent" battery: bad settings, bad numbers, damaged files and operating-system failures, each run as a
new user would run it; prints a markdown table (kind, command, the one line printed, exit code, disk before/after).

  nice -n 10 python experiments/silent_battery.py --workdir=/tmp/battery

Rows that need a read-only or a tiny file system mount tmpfs folders (root only; skipped otherwise). Every run uses
the :tiny configs and random tiny models.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "bar_jax.train"]
GENERATE = [sys.executable, "-m", "bar_jax.generate"]


def listing(path: str) -> str:
  if not os.path.exists(path):
    return "absent"
  if not os.path.isdir(path):
    return "a file"
  names = sorted(os.listdir(path))
  hidden = [n for n in names if n.startswith(".")]
  shown = ", ".join(n for n in names if not n.startswith("."))
  return (shown or "empty") + (f" + hidden {hidden}" if hidden else "")


def run(cmd: list[str]) -> tuple[int, str]:
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  lines = [l for l in out.stderr.splitlines() if l.startswith("error:")] or out.stdout.strip().splitlines()[-2:-1]
  n_err = len([l for l in out.stderr.splitlines() if l.strip() and "it/s" not in l and "s/it" not in l])
  return out.returncode, (lines[-1] if lines else "") + (f" [{n_err} stderr lines]" if n_err > 1 else "")


def mount(path: str, opts: str) -> bool:
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], capture_output=True).returncode == 0


def umount(path: str) -> None:
  subprocess.run(["umount", path], capture_output=True)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  w = ap.parse_args().workdir
  shutil.rmtree(w, ignore_errors=True)
  os.makedirs(w)
  rows = []

  def row(kind, cmd, watch, shown=None, prepare=None):
    if prepare:
      prepare()
    before = listing(watch)
    code, line = run(cmd)
    rows.append((kind, " ".join(shown or cmd[2:]), line, code, before, listing(watch)))
    print(rows[-1], flush=True)

  lm = ["--config=configs/train_lm.py:tiny"]
  row("setting: negative steps", TRAIN + lm + [f"--workdir={w}/a", "--config.phases.midtrain.steps=-3"], f"{w}/a")
  row("setting: negative lr", TRAIN + lm + [f"--workdir={w}/a", "--config.phases.midtrain.opt.lr=-1e-3"], f"{w}/a")
  row("setting: top_k > experts", TRAIN + ["--config=configs/merge.py", f"--config.branches={w}/b1,{w}/b2",
                                           "--config.moe.top_k=9", f"--workdir={w}/moe"], f"{w}/moe")
  row("setting: list on the command line", TRAIN + ["--config=configs/bar_smollm2.py:tiny", f"--workdir={w}/p",
                                                    "--config.domains=math,code", "--config.merge.moe.top_k=4"],
      f"{w}/p")
  row("setting: duplicate domain", TRAIN + ["--config=configs/bar_smollm2.py:tiny", f"--workdir={w}/p",
                                            "--config.domains=math,math"], f"{w}/p")
  with open(f"{w}/bad_config.py", "w") as f:
    f.write("import ml_collections\n\ndef get_config(:\n  pass\n")
  row("config: syntax error", TRAIN + [f"--config={w}/bad_config.py", f"--workdir={w}/c"], f"{w}/c")
  row("config: bad variant", TRAIN + ["--config=configs/bar_smollm2.py:bogus", f"--workdir={w}/c"], f"{w}/c")
  row("CLI: no --workdir", TRAIN + lm, f"{w}/c")
  open(f"{w}/afile", "w").write("x")
  row("OS: workdir is a file", TRAIN + lm + [f"--workdir={w}/afile"], f"{w}/afile")
  if mount(f"{w}/ro", "ro,size=64m"):
    row("OS: read-only workdir (merge)", TRAIN + ["--config=configs/merge.py", f"--config.branches={w}/b1,{w}/b2",
                                                  f"--workdir={w}/ro/moe"], f"{w}/ro")
    umount(f"{w}/ro")
  if mount(f"{w}/small", "size=2m"):
    row("OS: disk without room (preflight)", TRAIN + lm + [f"--workdir={w}/small/lm"], f"{w}/small")
    umount(f"{w}/small")
  if mount(f"{w}/full", "size=6m"):  # room for the first checkpoints, not for the artifact
    row("OS: disk fills during the run", TRAIN + lm + [f"--workdir={w}/full/lm", "--min_free_mb=1"], f"{w}/full/lm")
    umount(f"{w}/full")

  # A finished run, then: its artifact write killed half-way, and a checkpoint damaged on disk.
  lm_dir = f"{w}/lm"
  # The finished run keeps its checkpoints (a finished stage deletes them by default) for the damage rows below.
  lm = lm + ["--config.keep_checkpoints=True"]
  row("run: a stage's summary", TRAIN + lm + [f"--workdir={lm_dir}"], lm_dir)

  def kill_artifact_write():  # what a kill between write()'s final moves and before its rename leaves
    os.remove(f"{lm_dir}/manifest.json")
    os.makedirs(f"{w}/.lm.tmp-deadbeef/params")

  def damage_last_checkpoint():
    state = f"{lm_dir}/phases/midtrain/checkpoints/12/state"
    biggest = max(glob.glob(f"{state}/**/*", recursive=True), key=lambda p: os.path.getsize(p) if
                  os.path.isfile(p) else -1)
    with open(biggest, "r+b") as f:
      f.seek(os.path.getsize(biggest) // 2)
      data = f.read(8)
      f.seek(os.path.getsize(biggest) // 2)
      f.write(bytes(b ^ 0xFF for b in data))
    shutil.rmtree(f"{lm_dir}/params")
    os.remove(f"{lm_dir}/manifest.json")

  row("leftovers: killed artifact write", TRAIN + lm + [f"--workdir={lm_dir}"], w, prepare=kill_artifact_write)
  row("numbers: damaged checkpoint", TRAIN + lm + [f"--workdir={lm_dir}"], f"{lm_dir}/phases/midtrain/checkpoints",
      prepare=damage_last_checkpoint)
  row("numbers: damaged checkpoint, fallback", TRAIN + lm + [f"--workdir={lm_dir}", "--checkpoint_fallback"],
      f"{lm_dir}/phases/midtrain/checkpoints")
  row("generate: negative temperature", GENERATE + [f"--model={lm_dir}", "--prompt=hi", "--temperature=-1"], lm_dir)
  row("generate: top_p > 1", GENERATE + [f"--model={lm_dir}", "--prompt=hi", "--top_p=2"], lm_dir)
  row("generate: prompt beyond the context", GENERATE + [f"--model={lm_dir}", "--raw", "--prompt=" + "word " * 600],
      lm_dir, shown=["bar_jax.generate", f"--model={lm_dir}", "--raw", "--prompt='word ' x 600"])

  print("\n| kind | command | printed | exit | disk before -> after |\n|---|---|---|---|---|")
  for kind, cmd, line, code, before, after in rows:
    print(f"| {kind} | `{cmd}` | {line} | {code} | {before} -> {after} |")


if __name__ == "__main__":
  main()
