"""A bar_jax model for the lm-evaluation-harness (`lm-eval`, an optional dependency: requirements-test.txt).

Any artifact (dense, branch, merged or routed MoE) or the packaged base runs every harness task:

  python -m lm_eval --model bar_jax --model_args model=runs/bar_smollm2/routed,batch_size=16 \
      --tasks gsm8k,mmlu,ifeval --include_path bar_jax/evals   # --include_path only registers nothing; see below
  # or from Python: lm_eval.simple_evaluate(model=BarJaxLM(model="runs/..."), tasks=[...])

(`import bar_jax.evals.lm_eval_model` registers the name "bar_jax"; the `bar-jax-lm-eval` route is
`python -m bar_jax.evals.lm_eval_model --model_args ... --tasks ...`, which imports it and hands over to lm-eval.)

The three request kinds:
  loglikelihood          log p(continuation | context) and whether greedy decoding would produce it; context and
                         continuation tokenised separately (context's trailing spaces move to the continuation, as
                         lm-eval's HF model does), left-truncated to max_length; batched into padded rows.
  loglikelihood_rolling  the whole text's log-likelihood in disjoint windows of max_length (lm-eval's
                         get_rolling_token_windows), the first token conditioned on the end-of-text token.
  generate_until         greedy KV-cached decoding with continuous batching (bar_jax.model.generate), cut at the
                         first stop string.
Scores are float32 log-softmax values summed in float64: the same numbers as bar_jax's own NLL (tested).
"""
from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bar_jax.errors import BarError

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError:  # optional dependency
  raise BarError("lm-eval is not installed: pip install -r requirements-test.txt (lm-eval is optional)") from None


def load(spec: str):
  """(cfg, params, tokenizer) of an artifact dir, "smollm2" (the packaged GGUF) or "tiny[:seed]" (random, tests):
  bar_jax/io/models.py load_model, the loader of the stages and the CLI."""
  from bar_jax.io import models
  model = models.load_model(spec)
  return model.cfg, model.params, model.tokenizer


@functools.partial(jax.jit, static_argnames=("cfg",))
def _token_logprobs(params, inputs, targets, *, cfg):
  """log p(target) at every position and whether it is the argmax, [batch, seq] each."""
  from bar_jax.model import transformer
  logits, _ = transformer.forward(params, inputs, cfg)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return picked, jnp.argmax(logp, axis=-1) == targets


@register_model("bar_jax")
class BarJaxLM(LM):
  """lm-eval's LM interface over a bar_jax model. model_args: model=SPEC, batch_size, max_length, max_gen_toks."""

  def __init__(self, model: str = "smollm2", batch_size: int | str = 8, max_length: int | None = None,
               max_gen_toks: int = 256, loaded: tuple | None = None, **_ignored):
    super().__init__()
    self.cfg, self.params, self.tokenizer = loaded if loaded is not None else load(model)
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
    self.max_length = int(max_length or self.cfg.max_seq_len)
    self.max_gen_toks = int(max_gen_toks)
    self.prefix_id = self.tokenizer.eos_ids[0]  # what a document's first token is conditioned on

  # -- scoring ----------------------------------------------------------------------------------------------------

  def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(cont | ctx), greedy) per (context ids, continuation ids); rows padded to a multiple of 32."""
    out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      seqs = []
      for i in chunk:
        ctx, cont = pairs[i]
        seq = (ctx + cont)[-(self.max_length + 1):]
        seqs.append((seq, len(cont)))
      width = max(len(s) - 1 for s, _ in seqs)
      width = -(-width // 32) * 32
      rows = self.batch_size
      inputs = np.full((rows, width), self.tokenizer.pad_id, np.int32)
      targets = np.zeros((rows, width), np.int32)
      for r, (seq, _) in enumerate(seqs):
        inputs[r, :len(seq) - 1] = seq[:-1]
        targets[r, :len(seq) - 1] = seq[1:]
      logp, greedy = _token_logprobs(self.params, jnp.asarray(inputs), jnp.asarray(targets), cfg=self.cfg)
      logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
      for r, (i, (seq, n_cont)) in enumerate(zip(chunk, seqs)):
        end = len(seq) - 1
        out[i] = (float(logp[r, end - n_cont:end].sum()), bool(greedy[r, end - n_cont:end].all()))
    return out

  def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = self.tokenizer.encode(context) if context else [self.prefix_id]
    return ctx, self.tokenizer.encode(continuation)

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    return self._score([self._split(*req.args[:2]) for req in requests])

  def loglikelihood_rolling(self, requests) -> list[float]:
    from lm_eval import utils
    results = []
    for req in requests:
      ids = self.tokenizer.encode(req.args[0])
      windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
          token_list=ids, prefix_token=self.prefix_id, max_seq_len=self.max_length, context_len=1)]
      results.append(sum(ll for ll, _ in self._score([(list(c), list(t)) for c, t in windows])))
    return results

  # -- generation ---------------------------------------------------------------------------------------------------

  def generate_until(self, requests) -> list[str]:
    from bar_jax.model import generate as gen
    out: list[str] = [""] * len(requests)
    todo = []
    for i, req in enumerate(requests):
      context, kwargs = req.args[0], dict(req.args[1] or {})
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
      ids = self.tokenizer.encode(context)[-(self.max_length - budget):] or [self.prefix_id]
      todo.append((i, ids, until, budget))
    outs = gen.generate(self.params, self.cfg, [t[1] for t in todo], max_new_tokens=[t[3] for t in todo],
                        eos_ids=self.tokenizer.eos_ids, pad_id=self.tokenizer.pad_id, batch_size=self.batch_size)
    for (i, _, until, _), o in zip(todo, outs):
      text = self.tokenizer.decode(o, skip_special_tokens=True)
      for stop in until:
        if stop and stop in text:
          text = text[:text.index(stop)]
      out[i] = text
    return out

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    return self.tokenizer.render_chat_text(chat_history, add_generation_prompt=add_generation_prompt)[0]

  @property
  def tokenizer_name(self) -> str:
    return "bar_jax"


def main(argv=None) -> None:
  """`python -m bar_jax.evals.lm_eval_model --model_args model=DIR --tasks gsm8k`: lm-eval's CLI with --model
  bar_jax registered."""
  from lm_eval.__main__ import cli_evaluate
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--model" not in argv:
    argv = ["--model", "bar_jax"] + argv
  sys.argv = [sys.argv[0]] + argv
  cli_evaluate()


if __name__ == "__main__":
  main()
