"""Helpers of the tests that run a stage in another process: kill -9 it between checkpoints, walk its manifests."""
import os
import signal
import subprocess
import time


def one_device_env(cache_dir=None) -> dict:
  """The environment of a stage run in a subprocess on one CPU device. With cache_dir, the runs of one test share a
  persistent compilation cache: the second and later runs load the program the first compiled (the same program on
  the same device, so bit-identity claims hold). One device only: on XLA:CPU, a cached multi-device program with
  cross-device collectives deadlocked when it was loaded back (tests/conftest.py)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count")))
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


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
