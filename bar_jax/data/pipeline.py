"""grain input pipelines: tokenise, pack (mid-training) or pad + mask (SFT), mix domains by weight, shard per
process, batch.

Every batch is a numpy dict the trainer consumes as is:
  inputs int32[B, T], targets int32[B, T] (next token), mask float32[B, T] (1 where the loss counts),
  segment_ids int32[B, T] (1.. per packed example, 0 = padding), positions int32[B, T] (restart at 0 per segment).

Examples are tokenised eagerly when a pipeline is built (default sizes are small), so every counter is exact before
the first batch: examples and loss tokens per domain, long documents split into context windows (mid-training;
no token is lost: consecutive windows overlap by one token so every target appears exactly once), over-long
conversations dropped or truncated (SFT), empty examples. Nothing is lost without being counted in `stats`.

The iterator is a grain DatasetIterator: deterministic given the seed, repeats epochs (num_epochs=None: forever,
each epoch reshuffled, domains drawn by weight; num_epochs=n: every element exactly n times, weights unused), and its
get_state()/set_state() (or grain.checkpoint.CheckpointSave with orbax) resume exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from bar_jax.errors import BarError
from bar_jax.data import capability

KINDS = ("lm", "sft")
OVERLONG = ("drop", "truncate")


@dataclasses.dataclass
class DomainStats:
  examples: int = 0            # source examples read
  rows: int = 0                # elements fed to the pipeline (windows for lm, conversations for sft)
  tokens: int = 0              # loss-bearing target tokens in one epoch
  split_into_windows: int = 0  # lm: documents longer than the context, split (nothing lost)
  truncated: int = 0           # sft, overlong="truncate": conversations cut to the context
  dropped_too_long: int = 0    # sft: conversations longer than the context, dropped (or cut to no answer)
  empty: int = 0               # examples with nothing to learn from (no tokens, or no assistant tokens)


@dataclasses.dataclass
class Batches:
  """A built pipeline: `iterator()` gives a fresh grain DatasetIterator; `stats` counts what went in."""
  dataset: Any                 # grain.IterDataset of batches
  stats: dict[str, DomainStats]
  spec: dict[str, Any]

  def iterator(self) -> grain.DatasetIterator:
    return iter(self.dataset)

  def summary(self) -> dict[str, dict[str, int]]:
    return {name: dataclasses.asdict(s) for name, s in self.stats.items()}


# ------------------------------------------------------------------------------------------------------------------
# Tokenisation: one element per row-to-be, {"inputs", "targets", "mask"} int32/float32 arrays of length <= T.

def _doc_end_id(tokenizer) -> int:
  return tokenizer.eos_ids[-1]  # the model's end-of-text token (after the end-of-turn token)


def lm_elements(texts: Sequence[str], tokenizer, seq_len: int, stats: DomainStats) -> list[dict[str, np.ndarray]]:
  """Each document + end-of-text, cut into windows of seq_len + 1 tokens overlapping by one (no target lost)."""
  out = []
  end = _doc_end_id(tokenizer)
  for text in texts:
    stats.examples += 1
    ids = tokenizer.encode(text) if text else []
    if not ids:
      stats.empty += 1
      continue
    ids = np.asarray(ids + [end], np.int32)
    starts = range(0, len(ids) - 1, seq_len)
    stats.split_into_windows += len(starts) > 1
    for s in starts:
      w = ids[s:s + seq_len + 1]
      out.append({"inputs": w[:-1], "targets": w[1:], "mask": np.ones(len(w) - 1, np.float32)})
      stats.tokens += len(w) - 1
  stats.rows += len(out)
  return out


def sft_elements(conversations: Sequence[Sequence[dict]], tokenizer, seq_len: int, stats: DomainStats,
                 overlong: str = "drop") -> list[dict[str, np.ndarray]]:
  """Chat-template ids; the loss mask is the tokenizer's (assistant content + its end-of-turn), shifted to targets."""
  if overlong not in OVERLONG:
    raise BarError(f"overlong={overlong!r}: use one of {list(OVERLONG)}")
  out = []
  for messages in conversations:
    stats.examples += 1
    ids, loss_mask = tokenizer.render_chat(messages)
    ids, loss_mask = np.asarray(ids, np.int32), np.asarray(loss_mask, np.float32)
    too_long = len(ids) - 1 > seq_len
    if too_long and overlong == "truncate":
      ids, loss_mask = ids[:seq_len + 1], loss_mask[:seq_len + 1]
    mask = loss_mask[1:]
    if too_long and (overlong == "drop" or not mask.any()):  # cutting it left no answer: as lost as dropping it
      stats.dropped_too_long += 1
      continue
    if len(ids) < 2 or not mask.any():
      stats.empty += 1
      continue
    stats.truncated += too_long
    out.append({"inputs": ids[:-1], "targets": ids[1:], "mask": mask})
    stats.tokens += int(mask.sum())
  stats.rows += len(out)
  return out


# ------------------------------------------------------------------------------------------------------------------
# Row formats.

def _pad_row(el: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  n = len(el["inputs"])
  row = {"inputs": np.full(seq_len, pad_id, np.int32), "targets": np.full(seq_len, pad_id, np.int32),
         "mask": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32),
         "positions": np.zeros(seq_len, np.int32)}
  row["inputs"][:n], row["targets"][:n], row["mask"][:n] = el["inputs"], el["targets"], el["mask"]
  row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
  return row


def from_packed(row: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
  seg = row["inputs_segment_ids"].astype(np.int32)
  real = seg > 0
  return {"inputs": np.where(real, row["inputs"], pad_id).astype(np.int32),
          "targets": np.where(real, row["targets"], pad_id).astype(np.int32),
          "mask": np.where(real, row["mask"], 0).astype(np.float32),
          "segment_ids": seg, "positions": np.where(real, row["inputs_positions"], 0).astype(np.int32)}


# ------------------------------------------------------------------------------------------------------------------
# Building.

def _normalise_weights(weights: Mapping[str, float]) -> dict[str, float]:
  bad = {k: w for k, w in weights.items() if not (isinstance(w, (int, float)) and w >= 0 and math.isfinite(w))}
  if bad or not weights or sum(weights.values()) <= 0:
    raise BarError(f"domain weights {dict(weights)} are invalid: give non-negative numbers with a positive sum")
  total = sum(weights.values())
  return {k: w / total for k, w in weights.items() if w > 0}


def build(examples: Mapping[str, Sequence], weights: Mapping[str, float], tokenizer, *, kind: str, seq_len: int,
          batch_size: int, seed: int = 0, num_epochs: int | None = None, overlong: str = "drop",
          process_index: int | None = None, process_count: int | None = None,
          spec: dict[str, Any] | None = None) -> Batches:
  """The pipeline over given examples (texts for kind="lm", conversations for kind="sft"), mixed by weight.

  batch_size is per process; each process reads every process_count-th element of the mixed stream.
  """
  if kind not in KINDS:
    raise BarError(f"unknown pipeline kind {kind!r}: use one of {list(KINDS)}")
  weights = _normalise_weights(weights)
  missing = sorted(set(weights) - set(examples))
  if missing:
    raise BarError(f"weights name domains {missing} that have no examples: give examples for them or drop them")
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  stats: dict[str, DomainStats] = {}
  parts, part_weights = [], []
  for d, (name, w) in enumerate(sorted(weights.items())):
    stats[name] = DomainStats()
    if kind == "lm":
      els = lm_elements(examples[name], tokenizer, seq_len, stats[name])
    else:
      els = sft_elements(examples[name], tokenizer, seq_len, stats[name], overlong)
    if not els:
      raise BarError(f"domain {name!r} has no usable {kind} examples ({dataclasses.asdict(stats[name])}): "
                     "check its source or raise seq_len")
    ds = grain.MapDataset.source(els).seed(seed * 1000 + d).shuffle()
    parts.append(ds)
    part_weights.append(w)
  for name, s in stats.items():
    lost = s.dropped_too_long + s.truncated + s.empty
    if lost:
      logging.warning("data %s/%s: %d of %d examples dropped or cut (%s)", kind, name, lost, s.examples,
                      {k: v for k, v in dataclasses.asdict(s).items()
                       if k in ("dropped_too_long", "truncated", "empty") and v})
  if num_epochs is None:  # endless: each domain reshuffled every epoch, drawn by weight
    parts = [p.repeat(None) for p in parts]
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, part_weights)
  else:  # a finite pass (evaluation, tests): every element exactly num_epochs times, order shuffled, weights unused
    mixed = grain.MapDataset.concatenate([p.repeat(num_epochs) for p in parts]).seed(seed).shuffle()
  mixed = mixed[process_index::process_count]
  pad = tokenizer.pad_id
  # Elements are tokenised already: reading is a few numpy copies, so no reader threads (they only contend for cores).
  it = mixed.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if kind == "lm":
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"inputs": seq_len, "targets": seq_len, "mask": seq_len}, num_packing_bins=batch_size,
        shuffle_bins=False)
    it = it.map(lambda row: from_packed(row, pad))
  else:
    it = it.map(lambda el: _pad_row(el, seq_len, pad))
  # Endless streams keep one batch shape; a finite run (num_epochs=n) ends with its last, smaller batch: no loss.
  it = it.batch(batch_size, drop_remainder=num_epochs is None)
  full_spec = {"kind": kind, "weights": weights, "seq_len": seq_len, "batch_size": batch_size, "seed": seed,
               "num_epochs": num_epochs, "overlong": overlong, "process_count": process_count, **(spec or {})}
  return Batches(it, stats, full_spec)


def _registry_examples(weights: Mapping[str, float], kind: str, split: str, max_examples: int) -> dict[str, list]:
  out = {}
  for name in weights:
    cap = capability.get(name)
    ex = cap.text_examples(split) if kind == "lm" else cap.chat_examples(split)
    out[name] = ex[:max_examples] if max_examples else ex
  return out


def lm_batches(weights: Mapping[str, float], tokenizer, *, seq_len: int, batch_size: int, split: str = "train",
               max_examples: int = 0, **kw) -> Batches:
  """Mid-training stream of capabilities (names or spec paths), e.g. weights={"math": 0.75, "general": 0.25}: packed
  rows."""
  spec = {"domains": sorted(weights), "split": split, "max_examples": max_examples}
  return build(_registry_examples(weights, "lm", split, max_examples), weights, tokenizer, kind="lm",
               seq_len=seq_len, batch_size=batch_size, spec=spec, **kw)


def sft_batches(weights: Mapping[str, float], tokenizer, *, seq_len: int, batch_size: int, split: str = "train",
                max_examples: int = 0, **kw) -> Batches:
  """SFT stream of capabilities (names or spec paths): one conversation per row, padded, loss on assistant tokens
  only."""
  spec = {"domains": sorted(weights), "split": split, "max_examples": max_examples}
  return build(_registry_examples(weights, "sft", split, max_examples), weights, tokenizer, kind="sft",
               seq_len=seq_len, batch_size=batch_size, spec=spec, **kw)


# ------------------------------------------------------------------------------------------------------------------
# Provenance and sampling.

def data_fingerprint(spec: Mapping[str, Any]) -> str:
  """sha256 of the data spec (capabilities, weights, lengths, seed, split...) plus each capability's fingerprint (its
  spec, and its data files' hashes or its sources' package versions)."""
  names = spec.get("domains") or sorted(spec.get("weights", {}))
  payload = {"spec": spec, "capabilities": {n: capability.get(n).fingerprint for n in names}, "bar_jax_data": 2}
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def stratified_sample(domains: Sequence[str] | str, fraction: float, seed: int = 0,
                      split: str = "train") -> dict[str, list]:
  """A `fraction` of each capability's SFT conversations (at least one each), chosen reproducibly: router training."""
  if not 0 < fraction <= 1:
    raise BarError(f"fraction={fraction} is outside (0, 1]: give the share of each domain's SFT data to sample")
  out = {}
  for d in capability.resolve(domains):
    convs = d.chat_examples(split)
    k = max(1, round(len(convs) * fraction))
    rng = random.Random(f"{seed}:{d.name}")
    out[d.name] = [convs[i] for i in sorted(rng.sample(range(len(convs)), k))]
  return out
