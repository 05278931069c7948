"""Helpers of the tests that run a stage in another process: kill -9 it between checkpoints, walk its manifests."""
import os
import signal
import subprocess
import time


def latest_step(ckpts) -> int:
  """The newest finished orbax checkpoint step under CKPTS (0 when there is none yet)."""
  names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
  return max([int(n) for n in names if n.isdigit()], default=0)


def kill_at_first_checkpoint(proc: subprocess.Popen, ckpts, timeout_s: float = 300) -> int:
  """SIGKILL `proc` as soon as its first checkpoint is written; returns the step of the newest checkpoint left."""
  deadline = time.time() + timeout_s
  while time.time() < deadline and not latest_step(ckpts) and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return latest_step(ckpts)


def walk_keys(d):
  """Every key of a JSON tree, at any depth."""
  if isinstance(d, dict):
    for k, v in d.items():
      yield k
      yield from walk_keys(v)
  elif isinstance(d, list):
    for v in d:
      yield from walk_keys(v)
