"""SIGTERM mid-run (a preempted pod slice, a SLURM job at its limit): the CLI checkpoints at the next step boundary,
says in one line to run the same command again and exits 75; that command resumes and ends bit-identical. With
several processes, a SIGTERM to one host stops every host at the same step (JAX's preemption sync point).

Run as a script (`python tests/test_preempt.py PROCESS_ID PORT`) it is one host of the two-process check.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from bar_jax.errors import PREEMPTED_EXIT
from bar_jax.io import artifact
from tests.run_helpers import latest_step, one_device_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 10, 5  # the regular checkpoints are 5 and 10: the signal lands after 5, so its own step is 6..9


def command(workdir):
  return [sys.executable, "-m", "bar_jax.train", "--config=configs/train_lm.py:tiny", f"--workdir={workdir}",
          f"--config.phases.midtrain.steps={STEPS}", f"--config.phases.midtrain.checkpoint_every={EVERY}"]


def test_sigterm_checkpoints_exits_75_and_the_same_command_resumes_bit_identical(tmp_path):
  env = one_device_env(tmp_path / "jax_cache")  # one device: the runs share one compiled program
  # The uninterrupted reference runs beside the preempted run (most of each run is start-up, one core each).
  full = subprocess.Popen(command(tmp_path / "full"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  cmd = command(tmp_path / "stopped")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  ckpts = tmp_path / "stopped" / "phases" / "midtrain" / "checkpoints"
  deadline = time.time() + 300
  while not latest_step(ckpts) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)  # a real signal, mid-run: after the first checkpoint, before the last step
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == PREEMPTED_EXIT, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("preempted: midtrain: stopped by SIGTERM after step ") and \
      "run the same command again to resume" in last, err[-2000:]
  stopped_at = int(last.split("after step ")[1].split()[0])
  assert EVERY < stopped_at < STEPS and latest_step(ckpts) == stopped_at  # its own checkpoint, not a regular one
  rows = [json.loads(line) for line in open(ckpts.parent / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, stopped_at + 1))  # every step up to it logged with it
  assert not artifact.is_complete(str(tmp_path / "stopped"))

  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert full.wait(timeout=300) == 0, full.stderr.read()[-2000:]
  resumed, reference = (artifact.read_manifest(str(tmp_path / d)) for d in ("stopped", "full"))
  assert resumed["leaf_fingerprints"] == reference["leaf_fingerprints"]
  rows = [json.loads(line) for line in open(ckpts.parent / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def _host(process_id: int, port: int) -> None:
  """One of two processes: counts steps until loop.Preemption says stop, then prints the step."""
  import jax
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=60)
  from bar_jax.stages.loop import Preemption
  preempt = Preemption()
  print("ready", flush=True)
  for step in range(1, 3000):
    time.sleep(0.01)
    if preempt.reached(step):
      print(f"stop {step}", flush=True)
      break
  preempt.close()
  jax.distributed.shutdown()


def test_sigterm_to_one_host_stops_every_host_at_the_same_step():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(one_device_env(), PYTHONPATH=REPO)  # the script imports tests.run_helpers
  hosts = [subprocess.Popen([sys.executable, __file__, str(i), str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for h in hosts:
    assert h.stdout.readline().strip() == "ready", h.stderr.read()[-2000:]
  hosts[1].send_signal(signal.SIGTERM)  # only one host is told, as when one VM of a slice is preempted
  outs = [h.communicate(timeout=120) for h in hosts]
  assert [h.returncode for h in hosts] == [0, 0], [o[1][-2000:] for o in outs]
  stops = [o[0].split() for o in outs]
  assert stops[0][0] == "stop" and stops[0] == stops[1], stops  # the same step on both


if __name__ == "__main__":
  _host(int(sys.argv[1]), int(sys.argv[2]))


def test_run_main_exits_75_with_one_line_on_preempted(capsys):
  """Experiments run their main() through errors.run_main: a Preempted run exits as the CLI does."""
  import pytest
  from bar_jax.errors import Preempted, run_main

  def main():
    raise Preempted("stopped by SIGTERM after step 6 of 10; run the same command again")
  with pytest.raises(SystemExit) as e:
    run_main(main)
  assert e.value.code == PREEMPTED_EXIT
  err = capsys.readouterr().err
  assert err == "preempted: stopped by SIGTERM after step 6 of 10; run the same command again\n"
