"""Batched decoding with a KV cache and continuous batching: greedy, or temperature + top-p sampling.

A fixed number of slots decode one token each per step (a jitted `jax.lax.while_loop`). A slot whose row has
produced an eos id or spent its token budget is refilled with the next waiting prompt, so a batch does not wait on
its longest reply. Each slot's cache row is a ring: every step writes one column for all slots, a refilled slot's
prompt goes into the columns just before the current one, and a per-slot validity mask alone says which columns a
slot attends. RoPE positions are per slot, so neither a prefill's left padding nor the ring's columns shift
anything.

Prompts are grouped by their padded length (powers of two; a bucket with fewer prompts than slots joins the next),
and each group runs its own slots, about half as many as its prompts, with a cache just long enough for it; refills
of a fixed number of rows are prefilled at their own padded length. A call compiles a handful of programs, not one
per request.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bar_jax.errors import BarError
from bar_jax.model import transformer
from bar_jax.model.config import Compute, ModelConfig

PREFILL_BYTES = 2 ** 31  # a prefill's attention scores (fp32, rows x heads x prompt x prompt) stay under this
CACHE_BYTES = 2 ** 31    # a group's KV cache (keys and values of every slot, layer and column) stays under this
                         # when the caller names a batch size


def _bucket(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """Samples ids [B] from logits [B, V] at a temperature, from the smallest set of tokens holding top_p mass."""
  logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)  # the top token always survives
  choice = jax.random.categorical(key, sorted_logits, axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def _pick(logits, key, temperature, top_p, greedy: bool):
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample_logits(logits, key, temperature, top_p).astype(jnp.int32)


def _empty_state(cfg: ModelConfig, slots: int, columns: int, new_bucket: int, dtype, pad_id: int, key) -> dict:
  """Every slot empty (done); column 0 is written next."""
  cache = transformer.init_cache(cfg, slots, columns, dtype)
  def zeros():  # distinct buffers: the state is donated
    return jnp.zeros((slots,), jnp.int32)
  return {"k": cache["k"], "v": cache["v"], "valid": jnp.zeros((slots, columns), bool), "column": jnp.int32(0),
          "last": zeros(), "position": zeros(), "n": zeros(), "budget": zeros(), "done": jnp.ones((slots,), bool),
          "out": jnp.full((slots, new_bucket), pad_id, jnp.int32), "key": key}


@functools.partial(jax.jit, static_argnames=("cfg", "compute", "greedy"), donate_argnames=("state",))
def _prefill(params, state, tokens, lengths, slots, budgets, eos_ids, pad_id, temperature, top_p, *,
             cfg: ModelConfig, compute: Compute, greedy: bool):
  """Prefills left-padded prompts tokens [R, P] (lengths [R]) into slots [R] and picks each one's first token; a
  slot index past the last slot marks a padding row, whose writes are dropped. The prompt's keys go into the ring
  columns just before the current one."""
  R, P = tokens.shape
  S = state["valid"].shape[1]
  pad = P - lengths
  positions = jnp.maximum(jnp.arange(P)[None] - pad[:, None], 0)
  prompt_valid = jnp.arange(P)[None] >= pad[:, None]
  cache = transformer.init_cache(cfg, R, P, state["k"].dtype)
  logits, cache = transformer.forward_cached(params, tokens, cache, cfg, compute=compute, positions=positions,
                                             kv_valid=prompt_valid, last_only=True)
  key, sub = jax.random.split(state["key"])
  first = _pick(logits[:, -1], sub, temperature, top_p, greedy)
  columns = (state["column"] - P + jnp.arange(P)) % S
  at = (slice(None), slots[:, None], columns[None, :])
  out = jnp.full((R, state["out"].shape[1]), pad_id, jnp.int32).at[:, 0].set(first)

  def put(name, value):
    return state[name].at[slots].set(value, mode="drop")

  return dict(state, key=key,
              k=state["k"].at[at].set(cache["k"], mode="drop"), v=state["v"].at[at].set(cache["v"], mode="drop"),
              valid=put("valid", jnp.zeros((R, S), bool).at[:, columns].set(prompt_valid)),
              last=put("last", first), position=put("position", lengths), n=put("n", jnp.ones_like(lengths)),
              budget=put("budget", budgets), done=put("done", jnp.isin(first, eos_ids) | (budgets <= 1)),
              out=put("out", out))


@functools.partial(jax.jit, static_argnames=("cfg", "compute", "greedy"), donate_argnames=("state",))
def _decode(params, state, stop_when_done, eos_ids, pad_id, temperature, top_p, *, cfg: ModelConfig,
            compute: Compute, greedy: bool):
  """Decodes one token per slot per step until at least stop_when_done slots are done (every active slot finishes
  within its budget, so the loop ends)."""
  B, S = state["valid"].shape
  rows = jnp.arange(B)

  def cond(s):
    return jnp.sum(s["done"]) < stop_when_done

  def body(s):
    active = ~s["done"]
    valid = s["valid"].at[:, s["column"]].set(active)
    cache = {"k": s["k"], "v": s["v"], "index": s["column"]}
    logits, cache = transformer.forward_cached(params, s["last"][:, None], cache, cfg, compute=compute,
                                               positions=s["position"][:, None], kv_valid=valid, ring=True)
    key, sub = jax.random.split(s["key"])
    nxt = _pick(logits[:, -1], sub, temperature, top_p, greedy)
    n = s["n"] + active
    finished = active & (jnp.isin(nxt, eos_ids) | (n >= s["budget"]))
    out = s["out"].at[rows, jnp.where(active, s["n"], s["out"].shape[1])].set(nxt, mode="drop")
    return dict(s, k=cache["k"], v=cache["v"], valid=valid, column=(s["column"] + 1) % S, key=key, out=out, n=n,
                last=jnp.where(active, nxt, pad_id), position=s["position"] + active, done=s["done"] | finished)

  return jax.lax.while_loop(cond, body, state)


def _run_group(params, cfg, prompts: list[list[int]], budgets: list[int], order: list[int], results: list, *,
               slots: int, refill: int, prompt_bucket: int, new_bucket: int, eos_ids, pad_id, temperature, top_p,
               key, compute: Compute, greedy: bool) -> None:
  """Decodes prompts[order] (ascending length, at most prompt_bucket) on `slots` slots, refilled `refill` at a time,
  each refill prefilled at its own padded length, into results[order]."""
  state = _empty_state(cfg, slots, prompt_bucket + new_bucket, new_bucket, compute.dtype, pad_id, key)
  args = (jnp.asarray(list(eos_ids), jnp.int32), jnp.int32(pad_id), jnp.float32(temperature), jnp.float32(top_p))
  waiting = list(order)
  owner = [-1] * slots           # the prompt each slot decodes, or -1
  while waiting or any(o >= 0 for o in owner):
    free = [s for s in range(slots) if owner[s] < 0]
    while waiting and len(free) >= min(refill, len(waiting)):
      group, waiting = waiting[:refill], waiting[refill:]
      width = _bucket(max(len(prompts[i]) for i in group), 8)  # its own padded length, not the group's longest
      tokens = np.full((refill, width), pad_id, np.int32)
      lengths, slot_ids, budget = np.ones(refill, np.int32), np.full(refill, slots, np.int32), np.ones(refill, np.int32)
      for r, i in enumerate(group):
        tokens[r, width - len(prompts[i]):] = prompts[i]
        lengths[r], slot_ids[r], budget[r] = len(prompts[i]), free[r], budgets[i]
        owner[free[r]] = i
      free = free[len(group):]
      state = _prefill(params, state, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(slot_ids),
                       jnp.asarray(budget), *args, cfg=cfg, compute=compute, greedy=greedy)
    # Stop when enough slots are done for the next refill (free slots count as done), or, with nothing waiting,
    # when every slot is.
    stop = min(refill, len(waiting)) if waiting else slots
    state = _decode(params, state, jnp.int32(stop), *args, cfg=cfg, compute=compute, greedy=greedy)
    done, out, n = (np.asarray(state[k]) for k in ("done", "out", "n"))
    for s in range(slots):
      if owner[s] >= 0 and done[s]:
        results[owner[s]] = out[s, :n[s]].tolist()
        owner[s] = -1


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
             eos_ids: Sequence[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None, max_len: int | None = None, batch_size: int | None = None,
             compute: Compute = Compute()) -> list[list[int]]:
  """Completions of token prompts, in order. Each row stops after its first eos id (which it includes) or its
  max_new_tokens (one for all, or one per prompt).

  batch_size: the slots decoding at once (None: every prompt at once, in one group); with a batch size, prompts are
  grouped by padded length and each group's slots also fit CACHE_BYTES. max_len caps prompt + completion (default
  and upper bound: cfg.max_seq_len).
  """
  if not prompts:
    return []
  prompts = [list(p) for p in prompts]
  lengths = [len(p) for p in prompts]
  if min(lengths) == 0:
    raise BarError("an empty prompt cannot be continued; give every prompt at least one token")
  limit = min(cfg.max_seq_len, max_len or cfg.max_seq_len)
  if max(lengths) >= limit:
    raise BarError(f"a prompt of {max(lengths)} tokens does not fit the context of {limit} tokens "
                   "(max_seq_len/max_len); shorten the prompt")
  asked = [max_new_tokens] * len(prompts) if np.ndim(max_new_tokens) == 0 else list(max_new_tokens)
  if len(asked) != len(prompts) or min(asked) < 1:
    raise BarError(f"max_new_tokens={max_new_tokens}; ask for at least 1 new token for every prompt")
  budgets = [min(a, limit - n) for a, n in zip(asked, lengths)]  # stay inside the trained positions
  new_bucket = _bucket(max(budgets), 8)
  by_length = sorted(range(len(prompts)), key=lambda i: lengths[i])
  groups = [by_length]
  if batch_size is not None:  # by padded length, a bucket with fewer than batch_size prompts joining the next one
    groups = [[]]
    for i in by_length:
      if len(groups[-1]) >= batch_size and _bucket(lengths[i], 8) > _bucket(lengths[groups[-1][-1]], 8):
        groups.append([])
      groups[-1].append(i)
  key = jax.random.key(0) if key is None else key
  results: list[Any] = [None] * len(prompts)
  itemsize = jnp.dtype(compute.dtype).itemsize
  for g, order in enumerate(groups):
    prompt_bucket = _bucket(lengths[order[-1]], 8)
    # Each slot takes about two prompts in turn, so a slot freed early is refilled rather than left idle.
    slots = _bucket(len(order)) if batch_size is None else min(batch_size, _bucket(-(-len(order) // 2)))
    columns = prompt_bucket + new_bucket
    slot_bytes = 2 * cfg.n_layers * columns * cfg.n_kv_heads * cfg.head_dim * itemsize
    while batch_size is not None and slots > 1 and slots * slot_bytes > CACHE_BYTES:
      slots //= 2
    refill = slots if batch_size is None else max(1, slots // 4)
    while refill > 1 and refill * cfg.n_heads * prompt_bucket * prompt_bucket * 4 > PREFILL_BYTES:
      refill //= 2
    _run_group(params, cfg, prompts, budgets, order, results, slots=slots, refill=refill,
               prompt_bucket=prompt_bucket, new_bucket=new_bucket, eos_ids=eos_ids, pad_id=pad_id,
               temperature=temperature, top_p=top_p, key=jax.random.fold_in(key, g), compute=compute,
               greedy=temperature <= 0.0)
  return results


def chat(params, cfg: ModelConfig, tokenizer, user_texts: Sequence[str], *, system: str | None = None,
         max_new_tokens: int = 128, **kw: Any) -> list[str]:
  """Assistant replies (special tokens removed) to single-turn user messages, in the model's chat format."""
  prompts = [tokenizer.format_prompt(t, system=system) for t in user_texts]
  outs = generate(params, cfg, prompts, max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_ids,
                  pad_id=tokenizer.pad_id, **kw)
  return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
