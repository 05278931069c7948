"""The testbed tasks' measured sizes: items, prompt and answer lengths in SmolLM2 tokens, the answer space, and
(with --base_items) the base model's greedy_match on the first held-out items.

  python experiments/testbed_tasks.py --out=experiments/results/testbed_tasks.md
  python experiments/testbed_tasks.py --base_items=50 --out=experiments/results/testbed_tasks.md   # + the base

Lengths: prompt = the rendered chat up to the assistant header (the default system prompt included), what the model
reads; answer = the answer's tokens + the end-of-turn token, what it must produce; row = the whole SFT conversation
(prompt + answer + the newline after it), which must fit configs/bar_testbed.py's seq_len. Over train and held-out
items together. top answer = the share of the most frequent training answer (what always answering it scores).
"""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np


def measure(task: str, tokenizer) -> dict:
  from bar_jax.data import capability
  from configs.bar_testbed import spec_path
  cap = capability.get(spec_path(task))
  train, evals = cap.chat_examples("train"), cap.eval_items()
  convs = train + [it["messages"] + [{"role": "assistant", "content": it["reference"]}] for it in evals]
  prompts = [len(tokenizer.render_chat(c[:-1], add_generation_prompt=True)[0]) for c in convs]
  rows = [len(tokenizer.render_chat(c)[0]) for c in convs]
  answers = [len(tokenizer.encode(c[-1]["content"])) + 1 for c in convs]
  top = collections.Counter(c[-1]["content"] for c in train).most_common(1)[0]
  return {"task": task, "train": len(train), "eval": len(evals), "prompt": prompts, "answer": answers, "row": rows,
          "top": (top[0], top[1] / len(train)), "example": evals[0]}


def base_scores(tasks, n: int) -> dict[str, float]:
  """The packaged base's greedy_match on the first n held-out items of each task."""
  from bar_jax import evals
  from bar_jax.io import models
  from configs.bar_testbed import get_config, spec_path
  c = get_config().eval
  base = models.load_model("smollm2")
  rep = evals.evaluate_model(base.params, base.cfg, base.tokenizer, [spec_path(t) for t in tasks], n_per_domain=n,
                             nll_seq_len=c.nll_seq_len, nll_batch_rows=c.nll_batch_rows)
  return {t: rep["domains"][t] for t in tasks}


def table(rows: list[dict], base: dict | None) -> str:
  def span(xs):
    return f"{int(np.median(xs))} / {int(np.percentile(xs, 95))} / {max(xs)}"
  head = "| # | task | train | eval | prompt p50 / p95 / max | answer p50 / p95 / max | row max | top answer |"
  if base:
    head += " base greedy_match % |"
  lines = [head, "|---" * (head.count("|") - 1) + "|"]
  for i, r in enumerate(rows, 1):
    line = (f"| {i} | {r['task']} | {r['train']} | {r['eval']} | {span(r['prompt'])} | {span(r['answer'])} | "
            f"{max(r['row'])} | `{r['top'][0]}` {100 * r['top'][1]:.0f}% |")
    if base:
      b = base[r["task"]]
      line += f" {b['value']:.1f} [{b['ci'][0]:.1f}, {b['ci'][1]:.1f}] (n={b['n']}) |"
    lines.append(line)
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="", help="write the markdown here (default: print it)")
  ap.add_argument("--base_items", type=int, default=0, help="also score the base on this many held-out items")
  args = ap.parse_args(argv)
  from bar_jax.data.sources import rgym_tasks
  from bar_jax.io import gguf
  t0 = time.time()
  tokenizer = gguf.load_tokenizer()
  rows = [measure(t, tokenizer) for t in rgym_tasks.TASKS]
  base = base_scores(list(rgym_tasks.TASKS), args.base_items) if args.base_items else None
  examples = "\n".join(f"- {r['task']}: {r['example']['messages'][-1]['content']!r} -> "
                       f"{r['example']['reference']!r}" for r in rows)
  cmd = "python experiments/testbed_tasks.py" + (f" --base_items={args.base_items}" if args.base_items else "")
  md = (f"# The testbed tasks: sizes and lengths in SmolLM2 tokens\n\nMade by: `{cmd} --out=...` "
        f"({time.time() - t0:.0f} s). Tasks 1-{len(rgym_tasks.TESTBED)} are the testbed in its order "
        "(configs/bar_testbed.py takes the first n), the rest spares. Lengths: prompt = rendered chat up to the "
        "assistant header (default system prompt included), answer = answer tokens + end-of-turn, row = the whole "
        "SFT conversation; top answer = the most frequent training answer and its share.\n\n"
        f"{table(rows, base)}\n\nFirst held-out item of each:\n\n{examples}\n")
  if args.out:
    with open(args.out, "w") as f:
      f.write(md)
  print(md)


if __name__ == "__main__":
  main()
