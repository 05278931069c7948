"""8 simulated CPU devices, set before jax is imported.

No persistent compilation cache: on XLA:CPU (jax 0.10.2) a train step with cross-device all-reduces, compiled in one
test and loaded back from the on-disk cache in a later one, deadlocked in its collectives' rendezvous and aborted
the whole run (tests/test_capabilities.py's second end-to-end chain, every time; fine with the cache off).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags = (flags + " --xla_force_host_platform_device_count=8").strip()
# The tests' programs are small, so compiling them costs more than running them: LLVM's optimisations off cut the
# suite's CPU time by about a quarter (a branch and four family tests: 113 s -> 83 s of CPU). Results stay IEEE
# float32 (XLA:CPU's fast-math is off at every level), so the float32-rounding tolerances apply unchanged.
if "xla_backend_optimization_level" not in flags:
  flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
  """Collect the session's garbage now, then freeze what is left (it lives until the process exits).

  Why: after its last test, a pytest-xdist worker reports back, and then pytest's clean-up runs five full garbage
  collections (to find exceptions raised in __del__); over a worker's heap after a long suite (~460k objects, each
  pass also calling jax's _xla_gc_callback) they took 8 s, past the 5 s that execnet waits before it sends the
  worker a SIGINT, which landed in jax's gc callback and printed a KeyboardInterrupt traceback after the summary.
  This hook runs before the worker reports back, so the time is spent here; with the survivors frozen, those five
  passes take ~0.1 s. Garbage made by the session is still collected (here) under pytest's unraisable hook."""
  gc.collect()
  gc.freeze()


# ----------------------------------------------------------------------------------------------------------------
# The real base model, loaded once per test session (the GGUF takes ~5-8 s; the tokenizer alone ~3 s).


@pytest.fixture(scope="session")
def smollm2():
  """(ModelConfig, float32 numpy params, Tokenizer) of SmolLM2-135M-Instruct from the packaged GGUF."""
  from bar_jax.io import gguf
  return gguf.load()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
  """Only the base tokenizer (~3 s), for tests that do not need the weights."""
  from bar_jax.io import gguf
  return gguf.load_tokenizer()


def make_byte_tokenizer():
  """A 259-token ChatML tokenizer (3 specials + the 256 byte symbols, no merges) for tiny-model tests: fast, and
  built by the same Tokenizer.from_gguf path as the real one. Use with tiny(vocab_size=259)."""
  from tokenizers import pre_tokenizers
  from bar_jax.data.tokenizer import Tokenizer
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
  return Tokenizer.from_gguf({
      "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
      "tokenizer.ggml.token_type": [3] * 3 + [1] * 256, "tokenizer.ggml.eos_token_id": 2,
      "tokenizer.chat_template": "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"})


@pytest.fixture(scope="session")
def byte_tokenizer():
  """make_byte_tokenizer(), once a session."""
  return make_byte_tokenizer()
