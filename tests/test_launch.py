"""Every `python -m bar_jax.train` command in experiments/launch/ builds its config the way the CLI does: the config
file loads with its `:arg`, every `--config.a.b=v` names an existing key and parses, and the settings pass the
range checks. Nothing runs; shell line continuations are joined and variables get plausible values."""
import glob
import itertools
import os
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from bar_jax import config_files, stage_configs, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "experiments", "launch")
TRAINING = ["configs/branch.py", "configs/rl.py", "configs/router.py", "configs/train_lm.py", "configs/upgrade.py"]
# Plausible values of the recipes' shell variables; a list gives one command per value. `"$@"` (extra arguments)
# expands to nothing.
VALUES = {"CONFIG": TRAINING, "WORKDIR": ["/shared/runs/math"], "SLURM_NNODES": ["4"], "GPUS_PER_NODE": ["8"],
          "NODES": ["4"], "RANK": ["0"]}
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def launch_commands() -> list[tuple[str, list[str]]]:
  """(where, argv after `python -m bar_jax.train`) for every such command in experiments/launch/."""
  out = []
  for path in sorted(glob.glob(os.path.join(LAUNCH, "*"))):
    text = open(path).read()
    if path.endswith(".md"):  # its code blocks only (line numbers kept)
      text = "".join(part if i % 2 else re.sub(r"[^\n]", "", part) for i, part in enumerate(text.split("```")))
    lines, i = text.splitlines(), 0
    while i < len(lines):
      n, line = i + 1, lines[i]
      while line.endswith("\\") and i + 1 < len(lines):  # a line continuation
        i += 1
        line = line[:-1] + " " + lines[i]
      i += 1
      if line.lstrip().startswith("#") or "python -m bar_jax.train" not in line:
        continue
      rest = line.split("python -m bar_jax.train", 1)[1].replace('"$@"', "")
      names = sorted(set(VARIABLE.findall(rest)))
      unknown = [v for v in names if v not in VALUES]
      assert not unknown, f"{path}:{n}: give ${unknown[0]} a plausible value in VALUES"
      for values in itertools.product(*(VALUES[v] for v in names)):
        sub = dict(zip(names, values))
        expanded = VARIABLE.sub(lambda m: sub[m.group(1)], rest)
        lexer = shlex.shlex(expanded.rstrip().removesuffix('"'),  # the end of a --command="..." string
                            posix=True, punctuation_chars="&|;")
        lexer.whitespace_split = True
        argv = list(itertools.takewhile(lambda t: t not in ("&&", "||", ";", "|"), lexer))
        out.append((f"{os.path.relpath(path, REPO)}:{n} {sub.get('CONFIG', '')}".strip(), argv))
  return out


COMMANDS = launch_commands()


def cli_config(argv: list[str]):
  """The config the CLI builds: train.parse_flags's list pre-pass, then ml_collections' own flag parsing (on a
  private FlagValues, so nothing global changes)."""
  spec = [a for a in argv if a.startswith("--config=")][-1].split("=", 1)[1]
  path, arg = (spec.split(":", 1) + [None])[:2]
  argv, lists = train._list_overrides(["bar_jax.train"] + argv, config_files.load_config_file(path, arg))
  config_args = [a for a in argv if a == argv[0] or a.startswith("--config")]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=config_args)
  fv(config_args)
  return fv.config, lists, [a for a in argv[1:] if not a.startswith("--config")]


def test_launch_commands_are_found():
  where = {w.split(":")[0] for w, _ in COMMANDS}
  assert where == {"experiments/launch/README.md", "experiments/launch/slurm_gpu.sbatch"}, where
  assert len(COMMANDS) >= 2 + len(TRAINING)


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_launch_command_matches_its_config(where, argv, monkeypatch):
  monkeypatch.chdir(REPO)
  assert sum(a.startswith("--config=") for a in argv) == 1, f"{where}: one --config=FILE[:arg]"
  config, lists, others = cli_config(argv)
  for key, _ in lists:  # the list pre-pass only takes keys that exist
    assert key in str(config), key
  for a in others:  # the CLI's other flags
    name = a.lstrip("-").split("=", 1)[0]
    assert name in ("workdir", "checkpoint_fallback", "nocheckpoint_fallback", "min_free_mb"), f"{where}: {a}"
  stage_configs.load(config)  # the stage's typed schema: every key known, typed and in range (Compute included)


def test_an_unknown_key_is_caught():
  """The check itself: the recipe's old `--config.model.dtype` fails as it did on the command line."""
  with pytest.raises((KeyError, AttributeError, flags.Error)):
    cli_config(["--config=configs/branch.py", "--config.model.dtype=bfloat16"])
