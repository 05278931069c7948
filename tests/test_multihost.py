"""Two CPU processes on localhost as one JAX job train exactly like one process, and their checkpoint restores in one.

The test (one process, 8 simulated devices) starts this file twice as a script: `--process_id=0|1`, each process
with 4 simulated CPU devices, joined by jax.distributed.initialize on a localhost coordinator (CPU collectives go
over gloo, the default `jax_cpu_collectives_implementation`). Both run `loop.train` on the same 8-device mesh; each
feeds only its half of every global batch (`sharding.global_batch` -> make_array_from_process_local_data).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from configs.common import opt_defaults
import numpy as np

STEPS, GLOBAL_BATCH, SEQ = 4, 8, 16
MESH = {"data": 2, "fsdp": 2, "expert": 2}  # batch splits over all three; embed over fsdp, experts over expert


def _cfg():
  from bar_jax.model.config import tiny
  return tiny(ffn="moe", n_experts=2)


def _opt():
  return opt_defaults(lr=1e-2, warmup_steps=1, weight_decay=0.01)


def _global_batch(step: int, vocab: int) -> dict[str, np.ndarray]:
  """The step-th global batch, identical in every process (seeded by step)."""
  rng = np.random.default_rng(1000 + step)
  tokens = rng.integers(0, vocab, (GLOBAL_BATCH, SEQ + 1), dtype=np.int32)
  mask = (rng.random((GLOBAL_BATCH, SEQ)) < 0.8).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask,
          "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (GLOBAL_BATCH, SEQ)).copy(),
          "segment_ids": np.ones((GLOBAL_BATCH, SEQ), np.int32)}


def _batches(process_id: int, n_processes: int, vocab: int):
  per = GLOBAL_BATCH // n_processes
  step = 0
  while True:
    b = _global_batch(step, vocab)
    yield {k: v[process_id * per:(process_id + 1) * per] for k, v in b.items()}
    step += 1


def _run(workdir: str, process_id: int = 0, n_processes: int = 1):
  """The same training run in every setting: a 2-expert branch, midtrain partition (anchor frozen)."""
  import jax
  from bar_jax import sharding
  from bar_jax.model import transformer
  from bar_jax.stages import loop
  from bar_jax.transforms import freeze
  cfg = _cfg()
  params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(0)))  # host arrays, same everywhere
  part = freeze.make_partition(params, cfg, freeze.SCHEDULE["midtrain"])
  mesh = sharding.make_mesh(MESH)
  return loop.train(params=params, cfg=cfg, part=part, loss_fn=loop.lm_loss(cfg, mesh, z_loss=1e-3, lb_loss=1e-2),
                    batches=_batches(process_id, n_processes, cfg.vocab_size), opt=_opt(), steps=STEPS,
                    workdir=workdir, mesh=mesh, identity={"test": "multihost"}, checkpoint_every=STEPS,
                    log_every=1), part, mesh


def _worker(process_id: int, port: int, workdir: str) -> None:
  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=120)
  assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
  _run(workdir, process_id, 2)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_two_processes_match_one_and_restore_in_one(tmp_path):
  import jax
  from bar_jax import optim, sharding
  from bar_jax.io.checkpoint import Checkpointer
  from bar_jax.transforms import freeze

  multi = str(tmp_path / "multi")
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), multi], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"

  single = str(tmp_path / "single")
  result, part, mesh = _run(single)
  want, got = _losses(single), _losses(multi)
  assert len(want) == len(got) == STEPS
  assert want[-1] < want[0]  # it trains
  # Two processes reduce gradients across hosts in another order than one process: float32 losses of ~5 agree to
  # ~1e-6 after one step and the Adam updates compound it over the steps; 1e-5 relative (~80 ulps) bounds that.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)

  # The two-process checkpoint restores in this one process, onto this process's 8-device mesh.
  trainable, _ = freeze.split(result.params, part)
  tx, _ = optim.adamw(_opt(), STEPS)
  shard = {k: v.sharding for k, v in trainable.items()}
  abstract = {"trainable": {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard[k]) for k, v in trainable.items()},
              "opt_state": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                       sharding=sharding.replicated(mesh)),
                                        jax.eval_shape(tx.init, trainable)),
              "step": jax.ShapeDtypeStruct((), np.int32, sharding=sharding.replicated(mesh))}
  ckpt = Checkpointer(os.path.join(multi, "checkpoints"))
  assert ckpt.latest_step() == STEPS
  state = ckpt.restore(STEPS, abstract)
  ckpt.close()
  assert int(state["step"]) == STEPS
  for k, v in trainable.items():
    # The same compounded reduction-order difference in the weights (order 0.1-1; atol for entries near zero).
    np.testing.assert_allclose(np.asarray(state["trainable"][k]), np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=k)
  # ... and what it restored is trained, not the initialisation.
  from bar_jax.model import transformer
  init, _ = freeze.split(transformer.init_params(_cfg(), jax.random.key(0)), part)
  # Trained leaves moved by lr-sized steps, orders of magnitude beyond allclose's default 1e-5 relative.
  assert all(not np.allclose(np.asarray(state["trainable"][k]), np.asarray(init[k])) for k in init)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
