"""Batched decoding with a KV cache: greedy, or temperature + top-p sampling.

Prompts are left-padded to a common length; each row gets its own RoPE positions (so padding shifts nothing) and a
key-validity mask (so padding is never attended to). One prefill fills the cache, then a `jax.lax.while_loop` decodes
one token per step for every row, until each row has produced an eos id or the token budget is spent. Prompt length,
batch size and max_new_tokens are rounded up to powers of two, so a session compiles a handful of programs, not one
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


def _bucket(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def buckets(n_prompts: int, longest: int, max_new: int) -> tuple[int, int, int]:
  """The padded (batch, prompt, new-token) sizes generate compiles for: powers of two (a handful of programs)."""
  return _bucket(n_prompts), _bucket(longest, 8), _bucket(max_new, 8)


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


@functools.partial(jax.jit, static_argnames=("cfg", "compute", "greedy", "new_bucket", "cache_len"))
def _generate(params, tokens, lengths, eos_ids, pad_id, max_new, temperature, top_p, key, *, cfg: ModelConfig,
              compute: Compute, greedy: bool, new_bucket: int, cache_len: int):
  """tokens [B, P] left-padded, lengths [B] -> (out [B, new_bucket] padded with pad_id, n_steps)."""
  B, P = tokens.shape
  pad = P - lengths                                              # [B] left padding per row
  positions = jnp.maximum(jnp.arange(P)[None] - pad[:, None], 0)
  kv_valid = jnp.arange(cache_len)[None] >= pad[:, None]        # [B, S]
  cache = transformer.init_cache(cfg, B, cache_len, compute.dtype)

  def pick(logits, key):
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_logits(logits, key, temperature, top_p).astype(jnp.int32)

  logits, cache = transformer.forward_cached(params, tokens, cache, cfg, compute=compute, positions=positions,
                                             kv_valid=kv_valid, last_only=True)
  key, sub = jax.random.split(key)
  first = pick(logits[:, -1], sub)
  out = jnp.full((B, new_bucket), pad_id, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, eos_ids) | (lengths == 0)   # empty rows are batch padding

  def cond(state):
    t, _, _, done, _, _ = state
    return (t + 1 < max_new) & ~jnp.all(done)

  def body(state):
    t, last, cache, done, out, key = state
    logits, cache = transformer.forward_cached(params, last[:, None], cache, cfg, compute=compute,
                                               positions=(lengths + t)[:, None], kv_valid=kv_valid)
    key, sub = jax.random.split(key)
    nxt = jnp.where(done, pad_id, pick(logits[:, -1], sub))
    out = out.at[:, t + 1].set(nxt)
    return t + 1, nxt, cache, done | jnp.isin(nxt, eos_ids), out, key

  t, _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), first, cache, done, out, key))
  return out, t + 1


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_ids: Sequence[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None, max_len: int | None = None,
             compute: Compute = Compute()) -> list[list[int]]:
  """Completions of token prompts. Each row stops after its first eos id (which it includes) or max_new_tokens.

  max_len caps prompt + completion (default and upper bound: cfg.max_seq_len). Rows padding the batch to a power
  of two have length 0 and start done.
  """
  if not prompts:
    return []
  lengths = [len(p) for p in prompts]
  if min(lengths) == 0:
    raise BarError("an empty prompt cannot be continued; give every prompt at least one token")
  limit = min(cfg.max_seq_len, max_len or cfg.max_seq_len)
  longest = max(lengths)
  if longest >= limit:
    raise BarError(f"a prompt of {longest} tokens does not fit the context of {limit} tokens "
                   "(max_seq_len/max_len); shorten the prompt")
  if max_new_tokens < 1:
    raise BarError(f"max_new_tokens={max_new_tokens}; ask for at least 1 new token")
  max_new = min(max_new_tokens, limit - longest)  # stay inside the positions the model was trained on
  batch, prompt_bucket, new_bucket = buckets(len(prompts), longest, max_new)
  tokens = np.full((batch, prompt_bucket), pad_id, np.int32)
  lens = np.zeros((batch,), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, prompt_bucket - len(p):] = p
    lens[i] = len(p)
  key = jax.random.key(0) if key is None else key
  out, _ = _generate(params, jnp.asarray(tokens), jnp.asarray(lens), jnp.asarray(list(eos_ids), jnp.int32),
                     jnp.int32(pad_id), jnp.int32(max_new), jnp.float32(temperature), jnp.float32(top_p), key,
                     cfg=cfg, compute=compute, greedy=temperature <= 0.0, new_bucket=new_bucket,
                     cache_len=prompt_bucket + new_bucket)
  out = np.asarray(out)
  eos = set(int(e) for e in eos_ids)
  results = []
  for row in out[:len(prompts)]:
    ids = []
    for i in row[:max_new].tolist():
      ids.append(i)
      if i in eos:
        break
    results.append(ids)
  return results


def chat(params, cfg: ModelConfig, tokenizer, user_texts: Sequence[str], *, system: str | None = None,
         max_new_tokens: int = 128, **kw: Any) -> list[str]:
  """Assistant replies (special tokens removed) to single-turn user messages, in the model's chat format."""
  prompts = [tokenizer.format_prompt(t, system=system) for t in user_texts]
  outs = generate(params, cfg, prompts, max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_ids,
                  pad_id=tokenizer.pad_id, **kw)
  return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
