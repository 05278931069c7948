"""Decoding: the KV cache with left padding gives exactly the tokens of full recomputation; the real SmolLM2 knows
Paris, finds real English far likelier than the same tokens shuffled, and stops its chat turn at <|im_end|>."""
import pathlib
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bar_jax.errors import BarError
from bar_jax.model import generate as gen
from bar_jax.model import transformer
from bar_jax.model.config import tiny


def _greedy_by_recompute(params, cfg, prompt, n, eos):
  """Reference: the whole sequence through forward() for every new token, one row at a time, no cache (right
  padding to one fixed length keeps this to one compilation; causal attention makes it invisible)."""
  fwd = jax.jit(lambda p, x: transformer.forward(p, x, cfg)[0][0])
  ids = list(prompt)
  for _ in range(n):
    padded = np.zeros((1, 32), np.int32)
    padded[0, :len(ids)] = ids
    ids.append(int(jnp.argmax(fwd(params, padded)[len(ids) - 1])))
    if ids[-1] in eos:
      break
  return ids[len(prompt):]


def test_kv_cache_with_left_padding_matches_full_recompute():
  cfg = tiny()
  params = transformer.init_params(cfg, jax.random.key(1))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 11, 2)]
  out = gen.generate(params, cfg, prompts, max_new_tokens=10, eos_ids=[], pad_id=0)
  for prompt, got in zip(prompts, out):
    assert got == _greedy_by_recompute(params, cfg, prompt, 10, set())
  # A row stops at its first eos id (included); the others carry on.
  eos = out[1][3]
  stopped = gen.generate(params, cfg, prompts, max_new_tokens=10, eos_ids=[eos], pad_id=0)
  for full, got in zip(out, stopped):
    expected = full[:full.index(eos) + 1] if eos in full else full
    assert got == expected


def test_continuous_batching_refills_slots_and_matches_full_recompute():
  """More prompts than slots, of two padded lengths, with their own budgets and an eos: each slot is refilled as
  its row ends and the ring cache wraps around (~30 steps on 2 slots of 24 columns), yet every row is the
  reference's."""
  cfg = tiny()
  params = transformer.init_params(cfg, jax.random.key(1))
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 11, 2, 7, 3, 9, 1, 4, 12, 6, 8, 2)]
  budgets = [10, 3, 7, 10, 1, 9, 10, 5, 10, 2, 8, 10]
  reference = [_greedy_by_recompute(params, cfg, p, b, set()) for p, b in zip(prompts, budgets)]
  got = gen.generate(params, cfg, prompts, max_new_tokens=budgets, eos_ids=[], pad_id=0, batch_size=2)
  assert got == reference
  eos = reference[0][4]  # some rows stop early on it, freeing their slot sooner
  expected = [r[:r.index(eos) + 1] if eos in r else r for r in reference]
  assert gen.generate(params, cfg, prompts, max_new_tokens=budgets, eos_ids=[eos], pad_id=0, batch_size=4) == expected


def test_long_prompts_get_fewer_slots_within_the_memory_bounds(monkeypatch):
  """With a batch size, prompts are grouped by padded length (a bucket with fewer prompts than the batch size joins
  the next); each group's KV cache stays under CACHE_BYTES and each prefill's attention scores under PREFILL_BYTES
  (one slot or one row may exceed them alone), and the replies come back in the prompts' order, equal to one
  unconstrained batch's."""
  cfg = tiny()
  params = transformer.init_params(cfg, jax.random.key(1))
  lengths = [3, 60, 5, 120, 7, 9, 100, 4, 2, 6, 8, 1, 3]
  prompts = [[2 + (i + j) % 60 for j in range(n)] for i, n in enumerate(lengths)]
  reference = gen.generate(params, cfg, prompts, max_new_tokens=4, eos_ids=[], pad_id=0)
  slot_bytes = lambda columns: 2 * cfg.n_layers * columns * cfg.n_kv_heads * cfg.head_dim * 4
  monkeypatch.setattr(gen, "CACHE_BYTES", 8 * slot_bytes(8 + 8))             # eight slots of the shortest group
  monkeypatch.setattr(gen, "PREFILL_BYTES", 1 * cfg.n_heads * 16 * 16 * 4)   # one row of a 16-token prompt
  shapes, real_prefill, real_decode = [], gen._prefill, gen._decode
  monkeypatch.setattr(gen, "_prefill", lambda params, state, tokens, *a, **kw: shapes.append(
      ("prefill", tokens.shape, state["k"].shape[1:3])) or real_prefill(params, state, tokens, *a, **kw))
  monkeypatch.setattr(gen, "_decode", lambda params, state, *a, **kw: shapes.append(
      ("decode", None, state["k"].shape[1:3])) or real_decode(params, state, *a, **kw))
  got = gen.generate(params, cfg, prompts, max_new_tokens=4, eos_ids=[], pad_id=0, batch_size=8)
  assert got == reference
  # (slots, columns) per group, + 8 new tokens: bucket 8 (9 prompts, 8 slots refilled 2 at a time); buckets 16,
  # 64 and 128 (4 prompts) as one group, 2 slots by its size, 1 by the cache bound
  caches = sorted({s[2] for s in shapes})
  assert caches == [(1, 128 + 8), (8, 8 + 8)]
  assert all(slots * slot_bytes(columns) <= gen.CACHE_BYTES or slots == 1 for slots, columns in caches)
  prefills = [tokens for kind, tokens, _ in shapes if kind == "prefill"]
  assert (2, 8) in prefills and all(r * cfg.n_heads * p * p * 4 <= gen.PREFILL_BYTES or r == 1 for r, p in prefills)
  # Each refill is prefilled at its own padded length: the 9-token prompt of the 128-token group at 16.
  assert sorted(p for r, p in prefills if r == 1) == [16, 64, 128, 128]


def test_sampling_is_seeded_and_top_p_zero_is_greedy():
  cfg = tiny()
  params = transformer.init_params(cfg, jax.random.key(1))
  prompts = [[5, 6, 7], [9]]
  kw = dict(max_new_tokens=12, eos_ids=[], pad_id=0, temperature=1.0)
  a = gen.generate(params, cfg, prompts, top_p=1.0, key=jax.random.key(3), **kw)
  b = gen.generate(params, cfg, prompts, top_p=1.0, key=jax.random.key(3), **kw)
  c = gen.generate(params, cfg, prompts, top_p=1.0, key=jax.random.key(4), **kw)
  assert a == b and a != c
  greedy = gen.generate(params, cfg, prompts, max_new_tokens=12, eos_ids=[], pad_id=0)
  assert gen.generate(params, cfg, prompts, top_p=1e-6, key=jax.random.key(3), **kw) == greedy


def test_prompt_longer_than_context_is_one_line_error():
  cfg = tiny()
  params = transformer.init_params(cfg, jax.random.key(1))
  with pytest.raises(BarError, match=f"{cfg.max_seq_len + 5} tokens.*{cfg.max_seq_len}"):
    gen.generate(params, cfg, [[1] * (cfg.max_seq_len + 5)], max_new_tokens=4, eos_ids=[], pad_id=0)


@pytest.fixture(scope="module")
def real(smollm2):
  cfg, params, tok = smollm2
  return cfg, jax.device_put(params), tok


def test_smollm2_completes_the_capital_of_france(real):
  cfg, params, tok = real
  out = gen.generate(params, cfg, [tok.encode("The capital of France is")], max_new_tokens=4,
                     eos_ids=tok.eos_ids, pad_id=tok.pad_id)
  assert tok.decode(out[0]).startswith(" Paris")


def test_smollm2_perplexity_real_text_vs_shuffled(real):
  cfg, params, tok = real
  # Real English nobody here wrote: the stdlib's `argparse` module docstring (first 128 tokens).
  text = pathlib.Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_text().split('"""')[1]
  ids = tok.encode(text)[:128]
  assert len(ids) == 128
  shuffled = np.random.default_rng(0).permutation(ids).tolist()

  @jax.jit
  def ppl(params, x):
    logits = transformer.forward(params, x, cfg)[0]
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    return jnp.exp(-jnp.take_along_axis(logp, x[:, 1:, None], -1).mean(axis=(1, 2)))

  real_ppl, shuffled_ppl = np.asarray(ppl(params, jnp.asarray([ids, shuffled], jnp.int32)))
  print(f"perplexity real {real_ppl:.1f} shuffled {shuffled_ppl:.1f}")
  assert real_ppl < 60 and shuffled_ppl > 20 * real_ppl


def test_smollm2_chat_stops_at_end_of_turn(real):
  cfg, params, tok = real
  out = gen.generate(params, cfg, [tok.format_prompt("What is 2+3?")], max_new_tokens=16, eos_ids=tok.eos_ids,
                     pad_id=tok.pad_id)[0]
  assert out[-1] == tok.eot_id and tok.eot_id not in out[:-1] and len(out) < 16
  reply = tok.decode(out, skip_special_tokens=True)
  assert "5" in reply
  assert gen.chat(params, cfg, tok, ["What is 2+3?"], max_new_tokens=16) == [reply]
