"""The expert-parallel ragged exchange's offsets and sizes put every token copy on its expert's shard and bring its
result back to where it left, checked by a plain-numpy run of `ragged_all_to_all` as jax documents it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bar_jax.model import dispatch


def numpy_ragged_all_to_all(operands, outputs, params):
  """Each shard s sends operands[s][input_offsets[d]:+send_sizes[d]] to shard d, written there at output_offsets[d]
  (the sender's), as the pseudocode of jax.lax.ragged_all_to_all's docstring. Also checks that every receiver's
  recv_sizes[s] is what s sends it and that no two runs overwrite each other."""
  X = len(operands)
  result = [o.copy() for o in outputs]
  writes = [np.zeros(len(o), int) for o in outputs]
  for s in range(X):
    in_off, send, out_off, _ = params[s]
    for d in range(X):
      assert params[d][3][s] == send[d], f"shard {d} expects {params[d][3][s]} rows from {s}, which sends {send[d]}"
      assert 0 <= in_off[d] and in_off[d] + send[d] <= len(operands[s])
      assert 0 <= out_off[d] and out_off[d] + send[d] <= len(outputs[d])
      result[d][out_off[d]:out_off[d] + send[d]] = operands[s][in_off[d]:in_off[d] + send[d]]
      writes[d][out_off[d]:out_off[d] + send[d]] += 1
  assert all(w.max(initial=0) <= 1 for w in writes), "two runs landed on the same rows"
  return result


def draw_sizes(rng, X, El):
  """[X, E] group sizes: 0..4 copies per (shard, expert), about a third of the groups empty, sometimes a whole
  shard's or a whole expert's."""
  sizes = rng.integers(1, 5, (X, X * El)) * (rng.random((X, X * El)) > 0.35)
  if rng.random() < 0.3:
    sizes[rng.integers(X)] = 0
  if rng.random() < 0.3:
    sizes[:, rng.integers(X * El)] = 0
  return sizes.astype(np.int32)


# One jitted program per function, the shard a traced argument as under shard_map's axis_index.
dispatch_params = jax.jit(dispatch.ragged_dispatch_params)
return_params = jax.jit(dispatch.ragged_return_params)
local_expert = jax.jit(dispatch.received_local_expert, static_argnums=2)


@pytest.mark.parametrize("X,El", [(1, 3), (2, 1), (2, 2), (4, 1), (4, 3)])
def test_ragged_exchange_puts_every_copy_on_its_experts_shard_and_back(X, El):
  rng = np.random.default_rng(X * 10 + El)
  for _ in range(6):
    sizes = draw_sizes(rng, X, El)
    E = X * El
    dropped = rng.integers(0, 3, X)  # copies past capacity: they sort last and are never sent
    # Each source's rows, sorted by expert: (source, row, expert) labels, the dropped rows expert E.
    rows = [np.array([(s, j, e) for j, e in enumerate(np.concatenate(
        [np.repeat(np.arange(E), sizes[s]), np.full(dropped[s], E)]))], np.int64).reshape(-1, 3) for s in range(X)]
    n_copies = max(len(r) for r in rows)
    pad = lambda r: np.concatenate([r, np.tile([-2, -2, E], (n_copies - len(r), 1))])  # noqa: E731
    rows = [pad(r) for r in rows]  # the same n*k rows on every shard, the padding unsent like a dropped copy
    C = int(sizes.max())  # capacity: no group is larger
    n_recv = dispatch.ragged_recv_rows(n_copies, X, El, C)

    fwd = [tuple(np.asarray(a) for a in dispatch_params(sizes, np.int32(s))) for s in range(X)]
    recv = numpy_ragged_all_to_all(rows, [np.full((n_recv, 3), -1) for _ in range(X)], fwd)
    for d in range(X):
      mine = np.concatenate([r[(r[:, 2] // El == d) & (r[:, 2] < E)] for r in rows])  # source-major, sorted
      got = recv[d][:len(mine)]
      np.testing.assert_array_equal(got, mine)  # every copy for d's experts, once, in (source, expert) order
      assert (recv[d][len(mine):] == -1).all()  # and nothing else
      expected_e = np.concatenate([mine[:, 2] - d * El, np.full(n_recv - len(mine), El)])
      np.testing.assert_array_equal(np.asarray(local_expert(sizes, np.int32(d), n_recv)), expected_e)

    # The way back: shard d returns what it received (here the labels themselves) to each source.
    bwd = [tuple(np.asarray(a) for a in return_params(sizes, np.int32(d))) for d in range(X)]
    back = numpy_ragged_all_to_all(recv, [np.full((n_copies, 3), -1) for _ in range(X)], bwd)
    for s in range(X):
      sent = rows[s][:, 2] < E
      np.testing.assert_array_equal(back[s][sent], rows[s][sent])  # each copy back in the row it left from
      assert (back[s][~sent] == -1).all()


def test_ragged_expert_parallel_lowers_on_cpu():
  """The ragged path traces and lowers to StableHLO with its ragged all-to-alls; XLA:CPU cannot compile
  ragged-all-to-all (jax 0.10.2), so where it does compile the output is checked against the dense path."""
  mesh = jax.make_mesh((2, 1, 4, 1), ("data", "fsdp", "expert", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  E, k, N, D, F = 4, 2, 64, 8, 16
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (N, D))
  logits = jax.random.normal(ks[1], (N, E))
  idx = jax.lax.top_k(logits, k)[1]
  weights = jnp.zeros((N, E)).at[jnp.arange(N)[:, None], idx].set(jax.nn.softmax(jax.lax.top_k(logits, k)[0]))
  gate, up = (jax.random.normal(kk, (E, D, F)) / 3 for kk in ks[2:4])
  down = jax.random.normal(ks[4], (E, F, D)) / 4
  args = (x, weights, idx, gate, up, down)
  f = jax.jit(lambda *a: dispatch.expert_parallel(*a, mesh, 0.0, impl="ragged"))
  text = f.lower(*args).as_text()
  assert text.count("ragged_all_to_all") >= 2, "expected the dispatch and the return exchange"
  # The training step's backward pass: ragged_all_to_all's transpose is another ragged exchange.
  grad = jax.jit(jax.grad(lambda x, gate: dispatch.expert_parallel(x, weights, idx, gate, up, down, mesh, 0.0,
                                                                    impl="ragged")[0].sum(), argnums=(0, 1)))
  assert "ragged_all_to_all" in grad.lower(x, gate).as_text()
  try:
    compiled = f.lower(*args).compile()
  except Exception as e:  # noqa: BLE001 - XLA:CPU: "ragged-all-to-all" is not implemented
    assert "ragged" in str(e).lower(), e
    return
  y, dropped = compiled(*args)
  ref = jax.jit(lambda *a: dispatch.expert_parallel(*a, mesh, 0.0, impl="blocked"))(*args)[0]
  assert int(dropped) == 0
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-5, atol=2e-5)
