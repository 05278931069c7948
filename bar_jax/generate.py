"""The CLI: python -m bar_jax.generate --model=DIR_OR_smollm2 --prompt="..." [--max_new_tokens --temperature --top_p
--seed --raw --system]

Prints the model's completion. By default the prompt is one user turn in the model's chat format and the reply
stops at <|im_end|>; --raw continues the prompt text as it is. Bad input prints one line and exits 2.

  python -m bar_jax.generate --model=smollm2 --prompt="What is 2+3?"                  # 2 + 3 = 5
  python -m bar_jax.generate --model=smollm2 --raw --prompt="The capital of France is" # Paris...
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from bar_jax.errors import BarError

_MODEL = flags.DEFINE_string("model", "smollm2", "An artifact directory, or 'smollm2' (the packaged base model).")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt (a user message, or raw text with --raw).")
_SYSTEM = flags.DEFINE_string("system", None, "A system message (chat mode); default: the model template's own.")
_RAW = flags.DEFINE_bool("raw", False, "Continue the prompt text as is, without the chat template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; otherwise sample at this temperature.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: sample from the smallest set holding this mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def complete(model: str, prompt: str, *, raw: bool = False, system: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
  check_sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
  import jax
  from bar_jax.model import generate as gen
  from bar_jax.io import models
  m = models.load_model(model)
  tok = m.tokenizer
  ids = tok.encode(prompt) if raw else tok.format_prompt(prompt, system=system)
  if len(ids) + max_new_tokens > m.cfg.max_seq_len:  # the model would stop at its context, mid-answer, silently
    room = m.cfg.max_seq_len - len(ids)
    fix = f"set --max_new_tokens<={room} or shorten the prompt" if room > 0 else \
        f"shorten the prompt to under {m.cfg.max_seq_len} tokens"
    raise BarError(f"the prompt ({len(ids)} tokens) plus --max_new_tokens={max_new_tokens} exceeds the model's "
                   f"context of {m.cfg.max_seq_len} tokens; {fix}")
  out = gen.generate(jax.device_put(m.params), m.cfg, [ids], max_new_tokens=max_new_tokens, eos_ids=tok.eos_ids,
                     pad_id=tok.pad_id, temperature=temperature, top_p=top_p, key=jax.random.key(seed))[0]
  return tok.decode(out, skip_special_tokens=True)


def check_sampling(*, temperature: float, top_p: float, max_new_tokens: int) -> None:
  """One line for a sampling knob out of range (a negative temperature or top_p > 1 would sample something else)."""
  import math
  if not (math.isfinite(temperature) and temperature >= 0):
    raise BarError(f"--temperature={temperature} must be >= 0 (0 = greedy); e.g. --temperature=0.7")
  if not (0 < top_p <= 1):
    raise BarError(f"--top_p={top_p} must be in (0, 1] (1 = no nucleus cut); e.g. --top_p=0.9")
  if max_new_tokens < 1:
    raise BarError(f"--max_new_tokens={max_new_tokens} must be >= 1")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; quote the prompt: --prompt=\"...\"")
  if _PROMPT.value is None:
    _fail('--prompt is required, e.g. --prompt="What is 2+3?"')
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  try:
    print(complete(_MODEL.value, _PROMPT.value, raw=_RAW.value, system=_SYSTEM.value,
                   max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                   seed=_SEED.value))
  except BarError as e:
    _fail(str(e))


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main)
