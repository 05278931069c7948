"""Typed stage configs (bar_jax/stage_configs.py): every setting typed and range-checked beside its field, a bad one
refused in one line naming the field and the fix; the identity is the canonical typed config, the same whatever the
order or spelling of the overrides; identities stored by the code before the schema (v1) migrate to what a fresh run
of the same settings computes, so finished work is found and started work resumes."""
import json
import os

import pytest

from bar_jax import config_files, stage_configs
from bar_jax.errors import BarError
from bar_jax.io import workdir
from bar_jax.model.config import Compute
from bar_jax.stages import pipeline

HERE = os.path.dirname(os.path.abspath(__file__))
# v1 identities, written by the untyped code (commit 7eba69f, bar_jax.io.workdir.identity) for the configs below.
V1 = json.load(open(os.path.join(HERE, "data", "identities_v1.json")))


def cfg(name, arg=None, **over):
  c = config_files.stage_config(name, arg)
  for key, value in over.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return c


def today():
  """The same settings as V1's, built by today's code (compute.top_k is moe.top_k, no eval is "")."""
  cases = {
      "train_lm:tiny": cfg("train_lm", "tiny"),
      "branch:math,tiny": cfg("branch", "math,tiny"),
      "branch:tool_use,lora": cfg("branch", "tool_use,lora", base="runs/none/base"),
      "rl:math": cfg("rl", "math", model="runs/none/branch"),
      "router:tiny": cfg("router", "tiny", model="runs/none/merged"),
      "router": cfg("router", None, model="runs/none/merged"),
      "upgrade:tiny oracle": cfg("upgrade", "tiny", model="runs/none/merged", branch="runs/none/branch", mode="oracle",
                                 expert="2", router_update="none"),
      "merge top_k=2": cfg("merge", None, branches="runs/none/a,runs/none/b", base="runs/none/base", rule="weighted",
                           weights="1,2", **{"moe.top_k": 2}),
      "evaluate": cfg("evaluate", None, domains="math,code"),
      "evaluate top_k=2": cfg("evaluate", None, model="runs/none/routed", domains="math,code", **{"moe.top_k": 2}),
      "export_hf": cfg("export_hf", None, model="runs/none/merged"),
      "import_smollm2": cfg("import_smollm2", None),
  }
  for name, arg in (("bar_testbed", "n=2,tiny"), ("bar_smollm2", "tiny"), ("bar_smollm2", "table")):
    for step in pipeline.plan(config_files.stage_config(name, arg), "runs/none/pipeline"):
      cases[f"{name}:{arg} {step.name}"] = step.config
  return cases


def test_v1_identities_migrate_to_the_identity_of_a_fresh_run():
  now = today()
  assert set(now) == set(V1)
  for case, old in V1.items():
    assert "schema" not in old
    fresh = stage_configs.identity(now[case])
    assert fresh["schema"] == stage_configs.SCHEMA_VERSION
    migrated = stage_configs.migrate_identity(old)
    if fresh["stage"] == "evaluate":  # v1 scored by evaluation protocol 1: redone, never reused
      assert migrated["protocol"] == 1 and dict(migrated, protocol=fresh["protocol"]) == fresh, case
      continue
    assert migrated == fresh, (case, workdir.differences(migrated, fresh))
    assert stage_configs.migrate_identity(fresh) == fresh  # today's form is left as it is


def test_a_v1_workdir_is_found_finished_and_a_started_one_resumes(tmp_path):
  c = cfg("router", "tiny", model="runs/none/merged")
  old = V1["router:tiny"]
  done = tmp_path / "done"
  done.mkdir()
  (done / workdir.MANIFEST).write_text(json.dumps({"identity": old}))
  _, ident, state = stage_configs.begin(c, str(done))
  assert state == workdir.FINISHED
  step = pipeline.Step("routed", "router", str(done), c)
  assert step.done()
  started = tmp_path / "started"
  started.mkdir()
  (started / workdir.IDENTITY_FILE).write_text(json.dumps({"identity": old}))
  assert stage_configs.begin(c, str(started))[2] == workdir.RESUME
  phase = started / "phases" / "router"
  phase.mkdir(parents=True)
  (phase / workdir.IDENTITY_FILE).write_text(json.dumps({"identity": {"stage": old, "phase": "router"}}))
  workdir.claim_checkpoints(str(phase), {"stage": ident, "phase": "router"}, migrate=stage_configs.migrate_identity)
  with pytest.raises(BarError, match="checkpoint of another run"):
    workdir.claim_checkpoints(str(phase), {"stage": dict(ident, seed=1), "phase": "router"},
                              migrate=stage_configs.migrate_identity)
  # An rl stage's claim: its identity plus the task's own keys.
  rl = stage_configs.identity(cfg("rl", "math", model="runs/none/branch"))
  assert stage_configs.migrate_identity(dict(V1["rl:math"], task="math", n_prompts=3)) == dict(rl, task="math",
                                                                                                n_prompts=3)


def test_an_identity_that_does_not_migrate_is_refused_with_how_to_recreate_it(tmp_path):
  old = dict(V1["router:tiny"])
  del old["seed"]  # written before the key existed
  (tmp_path / workdir.MANIFEST).write_text(json.dumps({"identity": old}))
  with pytest.raises(BarError) as e:
    stage_configs.begin(cfg("router", "tiny", model="runs/none/merged"), str(tmp_path))
  line = str(e.value)
  assert "\n" not in line and "config.seed is missing" in line and "run the same command again" in line
  assert not pipeline.Step("routed", "router", str(tmp_path), cfg("router", "tiny")).done()


def test_identity_is_stable_under_override_order_and_list_spelling():
  a = config_files.apply_overrides(config_files.stage_config("router", "tiny"),
                               {"router": {"fraction": 0.1, "domains": "math,code"}, "model": "x", "seed": 3})
  b = config_files.apply_overrides(config_files.stage_config("router", "tiny"),
                               {"seed": 3, "model": "x", "router.domains": "math, code", "router.fraction": 0.1})
  c = config_files.apply_overrides(config_files.stage_config("router", "tiny"), {"seed": 3, "model": "x"})
  c.router.domains = "math,code"
  c.router.fraction = 0.1
  ids = [stage_configs.identity(x) for x in (a, b, c)]
  assert ids[0] == ids[1] == ids[2]
  assert ids[0]["router"]["domains"] == ["math", "code"]
  assert json.dumps(ids[0], sort_keys=True) == json.dumps(stage_configs.identity(stage_configs.load(a)),
                                                          sort_keys=True)


def test_run_time_keys_come_from_compute_and_never_reach_the_identity():
  assert {f for f in Compute.__dataclass_fields__} <= stage_configs.RUNTIME_KEYS
  base = stage_configs.identity(cfg("router", "tiny"))
  for key, value in (("compute.capacity_factor", 1.25), ("compute.dispatch", "dropless"), ("compute.remat", "full"),
                     ("router.checkpoint_every", 7), ("mesh.fsdp", 2)):
    assert stage_configs.identity(cfg("router", "tiny", **{key: value})) == base, key
  assert stage_configs.identity(cfg("router", "tiny", **{"moe.top_k": 2})) != base  # routing is the function


def test_the_pipelines_checkpoint_fallback_reaches_every_training_step_and_no_identity():
  """config.checkpoint_fallback (the CLI's --checkpoint_fallback) is run-time: the pipeline passes it to each branch
  and the router step, and no step's identity changes."""
  plans = {on: pipeline.plan(config_files.stage_config("bar_smollm2", "tiny", {"checkpoint_fallback": on}),
                             "runs/none/pipeline") for on in (False, True)}
  trains = [s for s in plans[True] if s.kind in ("branch", "router")]
  assert {s.kind for s in trains} == {"branch", "router"} and all(s.config.checkpoint_fallback for s in trains)
  assert not any(s.config.get("checkpoint_fallback") for s in plans[False])
  assert [s.identity() for s in plans[False]] == [s.identity() for s in plans[True]]


@pytest.mark.parametrize("name,arg,over,match", [
    ("branch", "math,tiny", {"phases.sft.steps": 0},
     r"^config.phases.sft.steps=0 is invalid: it must be an integer >= 1; set --config.phases.sft.steps"),
    ("branch", "math,tiny", {"phases.sft.opt.lr": -1e-3}, r"^config.phases.sft.opt.lr=-0.001 is invalid"),
    ("branch", "math,tiny", {"eval.domains": "none"}, r"^config.eval.domains='none': no eval is the empty list"),
    ("router", "tiny", {"router.init": "magic"},
     r"^config.router.init='magic' is invalid: it must be one of bar_jax/transforms/router_init.py METHODS"),
    ("router", "tiny", {"eval.domains": "math,auto"}, r"^config.eval.domains=\['math', 'auto'\] is invalid"),
    ("merge", None, {"branches": "a,b", "moe.top_k": 4}, r"config.moe.top_k=4 is more than the merged model's 3"),
    ("merge", None, {"weights": "1,x"}, r"^config.weights='1,x' is invalid: it must be a comma list of numbers"),
    ("evaluate", None, {"model": ""}, r"^config.model=\[\] is invalid: it must be one or more artifact dirs"),
    ("evaluate", None, {"compute.dtype": "float8"}, r"^config.compute: invalid compute config: dtype='float8'"),
    ("upgrade", "tiny", {"mode": "swap"}, r"^config.mode='swap' is invalid: it must be one of 'replace'"),
    ("bar_smollm2", "tiny", {"router.enabled": "maybe"}, r"^config.router.enabled='maybe' is invalid"),
    ("bar_smollm2", "tiny", {"domains": ["math", "poetry"]}, r"^config.domains: unknown domain 'poetry'"),
])
def test_a_bad_value_is_one_line_naming_the_field_and_the_fix(name, arg, over, match):
  c = cfg(name, arg)
  for key, value in over.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node.unlock()
    del node[last]
    node[last] = value
  with pytest.raises(BarError, match=match) as e:
    stage_configs.load(c)
  assert "\n" not in str(e.value)


def test_unknown_and_missing_keys_are_refused():
  c = cfg("router", "tiny")
  c.compute.top_k = 2  # routing is `moe` now
  with pytest.raises(BarError, match=r"^config.compute.top_k is not a setting here \(this section has dtype, remat"):
    stage_configs.load(c)
  c = cfg("router", "tiny")
  del c.router["init_rows"]
  with pytest.raises(BarError, match=r"^config.router.init_rows is missing: every setting is given by its config "):
    stage_configs.load(c)


def test_typed_lists_and_one_spelling_of_no_eval():
  for spelling in ("", []):
    c = cfg("router", "tiny")
    c.eval = type(c.eval)(dict(c.eval.to_dict(), domains=spelling))
    assert stage_configs.load(c).eval.domains == []
  m = stage_configs.load(cfg("merge", None, branches="a, b", weights="1,2"))
  assert (m.branches, m.weights) == (["a", "b"], [1.0, 2.0])
  u = stage_configs.load(cfg("upgrade", "tiny", expert="2"))
  assert u.expert == 2 and stage_configs.load(cfg("upgrade", "tiny", expert="math")).expert == "math"
  assert stage_configs.load(cfg("bar_smollm2", "tiny", **{"router.enabled": "False"})).router.enabled is False


def test_a_spec_file_capability_gets_the_generic_branch_defaults_not_maths():
  p = config_files.stage_config("bar_testbed", "n=2,tiny")
  del p.branch.overrides["phase_order"]
  spec = p.domains[0]
  bc = stage_configs.load(pipeline.branch_config(p, spec, "base"))
  assert bc.capability == spec and bc.phase_order == ["sft"]  # math's would be midtrain, sft
  assert stage_configs.load(pipeline.branch_config(p, "math", "base")).phase_order == ["midtrain", "sft"]


@pytest.mark.parametrize("name,arg", [
    ("train_lm", None), ("train_lm", "tiny"), ("branch", None), ("branch", "code,lora"), ("branch", "safety,tiny"),
    ("rl", "math"), ("rl", "tool_use,frozen"), ("merge", None), ("router", None), ("router", "tiny"),
    ("upgrade", None), ("upgrade", "tiny"), ("evaluate", None), ("export_hf", None), ("import_smollm2", None),
    ("bar_smollm2", None), ("bar_smollm2", "quick"), ("bar_smollm2", "table"), ("bar_smollm2", "tiny"),
    ("bar_testbed", "n=16,expert=ffn"), ("bar_testbed", "n=2,tiny")])
def test_every_config_file_reads_into_its_schema(name, arg):
  """The defaults in configs/ are complete and in range: each variant is a valid typed config as it stands."""
  c = stage_configs.load(config_files.stage_config(name, arg))
  assert isinstance(c, stage_configs.SCHEMAS[c.stage])
  assert json.loads(json.dumps(stage_configs.identity(c)))["schema"] == stage_configs.SCHEMA_VERSION
