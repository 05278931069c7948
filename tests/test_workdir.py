"""The workdir contract (bar_jax/io/workdir.py), the same for every stage: a finished output of the same identity is
returned untouched, one of another identity is refused in one line with nothing touched, a changed run-time knob
(remat, dispatch, dtype, checkpoint cadence) reuses it; inputs are named by fingerprint, not path."""
import importlib
import json
import os
import shutil

import pytest

from bar_jax import stage_configs
from bar_jax.errors import BarError
from bar_jax.io import workdir
from configs.common import parse_arg

# (config file, variant, a non-compute change, a compute change or None, the stage's result file)
STAGES = [
    ("train_lm", "tiny", {"seed": 1}, {"compute.remat": "full"}, workdir.MANIFEST),
    ("branch", "math,tiny", {"general_ratio": 0.5}, {"compute.remat": "full"}, workdir.MANIFEST),
    ("rl", "math", {"rl.temperature": 0.7}, {"compute.remat": "dots"}, workdir.MANIFEST),
    ("router", "tiny", {"router.fraction": 0.1}, {"compute.dispatch": "dropless"}, workdir.MANIFEST),
    ("upgrade", "tiny", {"mode": "add"}, {"compute.dispatch": "dropless"}, workdir.MANIFEST),
    ("merge", None, {"rule": "ties"}, {"mesh.fsdp": 2}, workdir.MANIFEST),
    ("evaluate", None, {"n_per_domain": 3}, {"compute.dtype": "bfloat16"}, "eval.json"),
    ("export_hf", None, {"max_shard_gb": 1.0}, None, "bar_jax_export.json"),
    ("import_smollm2", None, {"name": "other"}, None, workdir.MANIFEST),
]


def _config(name, arg, changes=None):
  c = importlib.import_module(f"configs.{name}").get_config(arg)
  for key, value in (changes or {}).items():
    *parents, last = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[last] = value
  return c


def _snapshot(d):
  out = {}
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, d)] = (os.path.getmtime(p), open(p, "rb").read())
  return out


@pytest.mark.parametrize("name,arg,change,compute,result_file", STAGES, ids=[s[0] for s in STAGES])
def test_every_stage_reuses_its_output_refuses_another_config(tmp_path, name, arg, change, compute, result_file):
  config = _config(name, arg)
  stage = importlib.import_module(f"bar_jax.stages.{config.stage}")
  wd = str(tmp_path / "out")
  os.makedirs(wd)
  # A finished output as the stage writes it: its result file records its identity (the stage checks nothing else
  # before deciding, so a stand-in is enough; test_train and test_pipeline run the real thing).
  with open(os.path.join(wd, result_file), "w") as f:
    json.dump({"identity": stage_configs.identity(config), "fingerprint": "f" * 64}, f)
  before = _snapshot(wd)
  assert stage.run(config, wd) == wd
  if compute:
    assert stage.run(_config(name, arg, compute), wd) == wd
  with pytest.raises(BarError, match=f"another {config.stage} run") as e:
    stage.run(_config(name, arg, change), wd)
  assert "\n" not in str(e.value) and list(change)[0] in str(e.value)
  assert _snapshot(wd) == before  # nothing touched


def test_resolve_order_and_checkpoint_claims(tmp_path):
  ident = {"stage": "train_lm", "seed": 0}
  wd = str(tmp_path / "w")
  assert workdir.resolve(wd, ident) == workdir.FRESH
  workdir.start(wd, ident)
  assert workdir.resolve(wd, ident) == workdir.RESUME
  with pytest.raises(BarError, match=r"started run .*\(seed: 0 -> 1\)"):
    workdir.resolve(wd, dict(ident, seed=1))
  with open(os.path.join(wd, workdir.MANIFEST), "w") as f:  # finished wins over the started run's file
    json.dump({"identity": dict(ident, seed=2)}, f)
  with pytest.raises(BarError, match="finished output"):
    workdir.resolve(wd, ident)
  assert workdir.resolve(wd, dict(ident, seed=2)) == workdir.FINISHED
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(BarError, match="no recorded run"):
    workdir.resolve(str(foreign), ident)
  assert (foreign / "notes.txt").read_text() == "mine"


def test_identity_drops_runtime_knobs_and_names_inputs_by_fingerprint(tmp_path):
  art = tmp_path / "a"
  art.mkdir()
  (art / workdir.MANIFEST).write_text(json.dumps({"fingerprint": "abc"}))
  c = _config("router", "tiny", {"model": str(art)})
  ident = stage_configs.identity(c)
  assert ident["model"] == "abc"
  moved = shutil.copytree(art, tmp_path / "elsewhere")
  assert stage_configs.identity(_config("router", "tiny", {"model": str(moved), "router.checkpoint_every": 1,
                                                     "mesh.fsdp": 2, "compute.remat": "full"})) == ident
  flat = json.dumps(ident)
  for key in stage_configs.RUNTIME_KEYS:
    assert f'"{key}"' not in flat
  assert "compute" not in ident  # how the run computes: run-time as a whole
  assert ident["moe"] == {"top_k": 0, "norm_topk": False}  # routing is part of the function, kept


def test_set_aside_keeps_every_stale_copy(tmp_path):
  d = tmp_path / "merged"
  for i in range(3):
    d.mkdir()
    (d / "manifest.json").write_text(str(i))
    workdir.set_aside(str(d))
  assert not d.exists()
  assert [(tmp_path / n / "manifest.json").read_text() for n in ("merged.stale", "merged.stale2", "merged.stale3")] \
      == ["0", "1", "2"]


def test_variant_parser_is_typed_and_refuses_unknown_words():
  a = parse_arg("code,lora,steps=3", positional=["domain"], domain="math", lora=False, steps=2)
  assert (a.domain, a.lora, a.steps) == ("code", True, 3)
  for bad, match in (("math,lora,tiny", "'tiny' is not one of"), ("steps=x", "not a int"),
                     ("lora=maybe", "true or false"), ("depth=3", "'depth' is not one of")):
    with pytest.raises(ValueError, match=match):
      parse_arg(bad, positional=["domain"], domain="math", lora=False, steps=2)
  with pytest.raises(ValueError, match="'huge' is not one of"):
    _config("branch", "math,lora,huge")
  with pytest.raises(ValueError, match="use one of"):
    _config("branch", "poetry")


def test_stages_import_libraries_never_other_stages():
  """A stage is a module of bar_jax/stages with a top-level run(config, workdir); the pipeline runs stages by name
  (importlib), like the CLI, and imports none of them."""
  import ast
  stages_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bar_jax", "stages")
  trees = {f[:-3]: ast.parse(open(os.path.join(stages_dir, f)).read()) for f in os.listdir(stages_dir)
           if f.endswith(".py") and f != "__init__.py"}
  stages = {name for name, tree in trees.items()
            if any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body)}
  assert {"train_lm", "branch", "rl", "router", "upgrade", "merge", "evaluate", "pipeline"} <= stages
  for name, tree in trees.items():
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == "bar_jax.stages":
        imported |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bar_jax.stages."):
        imported.add(node.module.rsplit(".", 1)[1])
      elif isinstance(node, ast.Import):
        imported |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("bar_jax.stages.")}
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
          and not node.attr.startswith("__") and node.value.id in trees:
        raise AssertionError(f"{name} uses the private name {node.value.id}.{node.attr}")
    assert not imported & stages, f"stage code {name} imports the stages {sorted(imported & stages)}"
