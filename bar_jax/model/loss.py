"""Next-token cross-entropy from the final hidden states and the LM head, a slice of positions at a time.

At V = 100k (OLMo 2) the [B, T, V] float32 logits take 0.4 MB per position, and the plain loss keeps several such
buffers for its backward (logits, softmax, their gradient). `token_cross_entropy` scans over `chunk`-position slices
of the sequence and computes each slice's logits under jax.checkpoint, so the backward recomputes them one slice at
a time: the largest buffer is [B, chunk, V], at the price of a second head matmul. Slices are cut along T, never B,
so each slice's logits keep the batch sharding of the hidden states.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bar_jax.model.config import ModelConfig

# Logits per sequence row of one slice (64 MiB float32): V = 100352 -> 128 positions, V = 49152 -> 256.
MAX_SLICE_LOGITS = 1 << 24


def head_kernel(params: dict, cfg: ModelConfig) -> jax.Array:
  """The LM head [D, V] (the embedding's transpose when tied), as transformer.lm_logits multiplies by it."""
  return params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]


def auto_chunk(seq_len: int, vocab: int) -> int:
  """Positions per slice: the largest power of two whose logits fit MAX_SLICE_LOGITS per row, or seq_len (one
  slice, i.e. the plain loss) when a whole row fits (SmolLM2 at T = 256, every tiny test model)."""
  chunk = 1 << max(0, (MAX_SLICE_LOGITS // vocab).bit_length() - 1)
  return seq_len if chunk >= seq_len else chunk


def token_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int = 0) -> jax.Array:
  """hidden [B, T, D] (final-norm states, compute dtype), head [D, V], targets [B, T] -> cross-entropy [B, T] float32.

  chunk: positions per slice (0: auto_chunk). One slice is exactly the plain loss on transformer.lm_logits; a
  ragged last slice is padded with zero states and sliced off.
  """
  B, T, D = hidden.shape
  chunk = chunk or auto_chunk(T, head.shape[-1])

  def ce(h, t):  # as transformer.lm_logits: the matmul in the compute dtype, the softmax in float32
    return optax.softmax_cross_entropy_with_integer_labels((h @ head.astype(h.dtype)).astype(jnp.float32), t)

  if chunk >= T:
    return ce(hidden, targets)
  n = -(-T // chunk)
  pad = n * chunk - T
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  split = lambda x: jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731 - [n, B, chunk, ...]
  piece = jax.checkpoint(lambda _, xs: (None, ce(*xs)))  # the backward recomputes one slice's logits at a time
  _, out = jax.lax.scan(piece, None, (split(hidden), split(targets)))
  return jnp.moveaxis(out, 0, 1).reshape(B, n * chunk)[:, :T]
