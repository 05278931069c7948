"""The layering, read from the source with ast (nothing is imported): no import cycle inside bar_jax, no stage
importing another stage, nothing outside bar_jax/stages importing it, a functional core (bar_jax/model,
bar_jax/transforms) that does no I/O, no arrow up from data/ to evals/, an io/ that knows no stage, and tests that
never import experiments/ (they run it)."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bar_jax")
# What the functional core may import from bar_jax: itself and the pure helpers.
CORE = ("bar_jax.model", "bar_jax.transforms")
PURE = CORE + ("bar_jax.errors", "bar_jax.pytree", "bar_jax.sharding", "bar_jax.fingerprints")
# Standard-library modules that reach files, processes or the network: the core never needs them.
IO_MODULES = {"os", "io", "pathlib", "shutil", "json", "pickle", "subprocess", "tempfile", "glob", "socket", "urllib",
              "http", "sqlite3", "orbax", "tensorboardX", "tokenizers", "gguf", "safetensors", "grain"}


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every bar_jax source file."""
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
  return out


MODULES = _modules()
TREES = {name: ast.parse(open(path).read(), path) for name, path in MODULES.items()}


def imports(name: str) -> set[str]:
  """Every module `name` imports, at module level or inside a function (a lazy import is still a dependency).
  `from pkg import sub` names the submodule when sub is one, else pkg."""
  out = set()
  package = name if MODULES[name].endswith("__init__.py") else name.rsplit(".", 1)[0]
  for node in ast.walk(TREES[name]):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against this module's package
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      for a in node.names:  # a submodule, or a name defined in the package (or module) `base`
        out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
  return out


def internal_graph() -> dict[str, set[str]]:
  """Edges between bar_jax modules."""
  return {m: {i for i in imports(m) if i in MODULES and i != m} for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
  """One cycle as [a, b, ..., a], or [] (depth-first search, three colours)."""
  colour, stack = {m: 0 for m in graph}, []

  def visit(m):
    colour[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if colour[n] == 1:
        return stack[stack.index(n):] + [n]
      if colour[n] == 0:
        found = visit(n)
        if found:
          return found
    colour[m] = 2
    stack.pop()
    return []

  for m in sorted(graph):
    if colour[m] == 0:
      found = visit(m)
      if found:
        return found
  return []


def stage_modules() -> set[str]:
  """The stages: modules of bar_jax.stages with a top-level run(config, workdir), what bar_jax.train dispatches to.
  Library modules living beside them (the training loop, shared helpers) have none."""
  out = set()
  for name, tree in TREES.items():
    if name.startswith("bar_jax.stages."):
      if any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body):
        out.add(name)
  return out


def test_the_checks_can_fail():
  """The checkers themselves, on made-up graphs and sources."""
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) == []
  TREES["bar_jax.stages._probe"] = ast.parse("from bar_jax.stages import merge\ndef run(config, workdir): pass")
  MODULES["bar_jax.stages._probe"] = "_probe.py"
  try:
    assert "bar_jax.stages.merge" in imports("bar_jax.stages._probe")
    assert "bar_jax.stages._probe" in stage_modules()
  finally:
    del TREES["bar_jax.stages._probe"], MODULES["bar_jax.stages._probe"]
  assert {"bar_jax.model.transformer", "bar_jax.stages.merge", "bar_jax.transforms.merge"} <= set(MODULES)


def test_no_import_cycle():
  cycle = find_cycle(internal_graph())
  assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_stage_imports_another_stage():
  """Stages share code through library modules (common, loop, rollouts, router_training), never through a stage."""
  stages = stage_modules()
  assert {"bar_jax.stages.merge", "bar_jax.stages.branch"} <= stages
  bad = sorted(f"{s} imports {i}" for s in stages for i in imports(s) if i in stages and i != s)
  assert not bad, "; ".join(bad)


def shell_imports() -> list[str]:
  """Modules outside bar_jax/stages that import from it. The shell imports the library, never the reverse: the
  report, config loading and model loading live below it, and the CLI reaches a stage by name (importlib)."""
  return sorted(f"{m} imports {i}" for m in MODULES if not m.startswith("bar_jax.stages")
                for i in imports(m) if i.startswith("bar_jax.stages"))


def test_the_library_never_imports_the_shell():
  TREES["bar_jax.evals._probe"] = ast.parse("def f():\n  from bar_jax.stages import common")
  MODULES["bar_jax.evals._probe"] = "_probe.py"
  try:
    assert shell_imports() == ["bar_jax.evals._probe imports bar_jax.stages.common"]  # the check can fail
  finally:
    del TREES["bar_jax.evals._probe"], MODULES["bar_jax.evals._probe"]
  assert not shell_imports(), "; ".join(shell_imports())


def test_functional_core_does_no_io():
  """model/ and transforms/ import only each other and the pure helpers from bar_jax, no I/O module, and never
  call open()."""
  problems = []
  for name, tree in TREES.items():
    if not name.startswith(CORE):
      continue
    for i in imports(name):
      top = i.split(".")[0]
      if top == "bar_jax" and i != "bar_jax" and not i.startswith(PURE):
        problems.append(f"{name} imports {i}")
      elif top in IO_MODULES:
        problems.append(f"{name} imports {i} (I/O)")
    problems += [f"{name} calls open()" for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "open"]
  assert not problems, "; ".join(problems)


# ----------------------------------------------------------------------------------------------------------------
# Known offences, each named: the checks below fail on any other, and on an entry here that no longer offends, so this
# list can only shrink. Remove an entry when its fix lands (issue 29 items 1 and 3).
KNOWN = {
    # data/capability.py builds each spec's metric from evals/menu.py; capability specs move above data/ and evals/.
    ("upward", "bar_jax.data.capability", "bar_jax.evals.menu"),
    # Tests that load an experiment by file path; each is to run it through its command line instead.
    ("test_imports_experiments", "tests/test_pipeline.py", "experiments/ledger.py"),
    ("test_imports_experiments", "tests/test_recipe.py", "experiments/routing_fix.py"),
    ("test_imports_experiments", "tests/test_router.py", "experiments/topk_sweep.py"),
}


def upward_imports() -> set[tuple[str, str, str]]:
  """bar_jax.data.* importing bar_jax.evals.*: evals reads data, never the reverse."""
  return {("upward", m, i) for m in MODULES if m.startswith("bar_jax.data")
          for i in imports(m) if i.startswith("bar_jax.evals")}


def _docstrings(tree) -> set[int]:
  """ids of the docstring nodes: prose may name a stage's file."""
  return {id(n.body[0].value) for n in ast.walk(tree)
          if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
          and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def stages_in_io(stage_names: set[str]) -> set[tuple[str, str, str]]:
  """What in bar_jax/io/ knows a stage: an import of bar_jax.stages, a string naming a stage module
  ("bar_jax.stages.x", "stages/x.py"), or a table keyed by stage names (a literal naming two or more stages; one
  name alone may be an artifact kind such as "branch" or a parameter such as "router")."""
  out = set()
  for name, tree in TREES.items():
    if not name.startswith("bar_jax.io"):
      continue
    out |= {("stage_in_io", name, i) for i in imports(name) if i.startswith("bar_jax.stages")}
    docs = _docstrings(tree)
    for n in ast.walk(tree):
      if (isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
              and ("bar_jax.stages" in n.value or "stages/" in n.value)):
        out.add(("stage_in_io", name, n.value))
      keys = n.keys if isinstance(n, ast.Dict) else n.elts if isinstance(n, (ast.Set, ast.List, ast.Tuple)) else []
      named = [k.value for k in keys if isinstance(k, ast.Constant) and k.value in stage_names]
      if len(named) >= 2:
        target = next((t.id for a in ast.walk(tree) if isinstance(a, (ast.Assign, ast.AnnAssign))
                       for t in (a.targets if isinstance(a, ast.Assign) else [a.target])
                       if isinstance(t, ast.Name) and a.value is n), f"line {n.lineno}")
        out.add(("stage_in_io", name, target))
  return out


LOADERS = {"spec_from_file_location", "import_module", "run_path", "run_module", "SourceFileLoader", "__import__"}


def experiment_imports(source: str, where: str) -> set[tuple[str, str, str]]:
  """A test importing experiments/: `import experiments...` / `from experiments... import`, or a loader
  (importlib's spec_from_file_location, import_module, runpy, ...; or a helper of the file that passes its argument
  to one) called on a path or name under experiments/, literally or through a variable assigned in the file.
  Running an experiment's command line (a subprocess) is not an import."""
  tree = ast.parse(source, where)
  out = set()
  for n in ast.walk(tree):
    mods = ([a.name for a in n.names] if isinstance(n, ast.Import)
            else [n.module or ""] if isinstance(n, ast.ImportFrom) and not n.level else [])
    out |= {("test_imports_experiments", where, m) for m in mods if m.split(".")[0] == "experiments"}
  called = lambda c: c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", None)
  loaders = set(LOADERS)
  for f in ast.walk(tree):  # helpers that hand one of their parameters to a loader load what they are given
    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
      params = {a.arg for a in f.args.args}
      if any(isinstance(c, ast.Call) and called(c) in LOADERS and params & {x.id for x in ast.walk(c)
                                                                          if isinstance(x, ast.Name)}
             for c in ast.walk(f)):
        loaders.add(f.name)
  assigned: dict[str, list] = {}
  for a in ast.walk(tree):
    if isinstance(a, ast.Assign):
      for t in a.targets:
        if isinstance(t, ast.Name):
          assigned.setdefault(t.id, []).append(a.value)

  def strings(node, seen=()):
    for x in ast.walk(node):
      if isinstance(x, ast.Constant) and isinstance(x.value, str):
        yield x.value
      elif isinstance(x, ast.Name) and x.id not in seen:
        for v in assigned.get(x.id, []):
          yield from strings(v, seen + (x.id,))

  for c in ast.walk(tree):
    if isinstance(c, ast.Call) and called(c) in loaders:
      parts = [s for a in c.args + [k.value for k in c.keywords] for s in strings(a)]
      if any(p == "experiments" or p.startswith(("experiments/", "experiments.")) for p in parts):
        label = next((p for p in parts if p.startswith(("experiments/", "experiments."))), None)
        out.add(("test_imports_experiments", where,
                  label or "experiments/" + next((p for p in parts if p.endswith(".py")), "?")))
  return out


def sources_of_tests() -> dict[str, str]:
  """{"tests/x.py": source} of every test module but this one (which reads experiments' sources to check names)."""
  tests = os.path.join(REPO, "tests")
  return {f"tests/{f}": open(os.path.join(tests, f)).read() for f in sorted(os.listdir(tests))
          if f.endswith(".py") and f != "test_imports.py"}


def test_the_layer_checks_can_fail():
  probe = ("import experiments.sweeps.common\nfrom experiments import ledger\nimport importlib.util, os\n"
           "def _load(p):\n  return importlib.util.spec_from_file_location('x', os.path.join('r', p))\n"
           "def test_a():\n  _load('experiments/ledger.py')\n"
           "def test_b():\n  path = os.path.join(ROOT, 'experiments', 'topk_sweep.py')\n"
           "  importlib.util.spec_from_file_location('t', path)\n"
           "def test_c():\n  importlib.import_module('experiments.run_baselines')\n"
           "def test_ok():\n  subprocess.run([sys.executable, 'experiments/run_baselines.py'])\n")
  assert {w for _, _, w in experiment_imports(probe, "t.py")} == {
      "experiments.sweeps.common", "experiments", "experiments/ledger.py", "experiments/topk_sweep.py",
      "experiments.run_baselines"}
  assert experiment_imports("import subprocess\nsubprocess.run(['python', 'experiments/x.py'])\n", "t.py") == set()
  TREES["bar_jax.io._probe"] = ast.parse('"""Runs bar_jax/stages/merge.py."""\nfrom bar_jax.stages import merge\n'
                                         'T = {"merge": 1, "branch": 2}\nK = ("dense", "branch")\n'
                                         'M = f"bar_jax.stages.{x}"\n')
  MODULES["bar_jax.io._probe"] = "_probe.py"
  TREES["bar_jax.data._probe"] = ast.parse("from bar_jax.evals import report\n")
  MODULES["bar_jax.data._probe"] = "_probe.py"
  try:
    assert {w for _, m, w in stages_in_io({"merge", "branch"}) if m == "bar_jax.io._probe"} == {
        "bar_jax.stages.merge", "T", "bar_jax.stages."}
    assert ("upward", "bar_jax.data._probe", "bar_jax.evals.report") in upward_imports()
  finally:
    for m in ("bar_jax.io._probe", "bar_jax.data._probe"):
      del TREES[m], MODULES[m]


def _check_against_known(found: set, kind: str) -> None:
  new = sorted(found - KNOWN)
  gone = sorted(k for k in KNOWN if k[0] == kind and k not in found)
  assert not new, f"{kind}: {new}"
  assert not gone, f"{kind}: fixed, so remove from KNOWN in tests/test_imports.py: {gone}"


def test_data_never_imports_evals():
  """The layers read downwards: evals scores what data reads, so data/ importing evals/ would be a circle in the
  making."""
  _check_against_known(upward_imports(), "upward")


def test_io_knows_no_stage():
  """io/ (artifacts, the workdir contract, checkpoints) serves every stage the same way: adding a stage never edits
  io/."""
  stage_names = {s.rsplit(".", 1)[1] for s in stage_modules()}
  assert {"merge", "branch", "train_lm"} <= stage_names
  _check_against_known(stages_in_io(stage_names), "stage_in_io")


def test_tests_never_import_experiments():
  """Experiments are thin callers of the stages; a test runs one through its command line (tests/
  test_baselines_cli.py) so a test never depends on an experiment's insides, and library code an experiment and a
  test share lives in bar_jax/."""
  found = set()
  for where, source in sources_of_tests().items():
    found |= experiment_imports(source, where)
  _check_against_known(found, "test_imports_experiments")


# ----------------------------------------------------------------------------------------------------------------
# Names: a script that imports a renamed function inside its main() fails only when someone runs it.

REPO = os.path.dirname(ROOT)
OWN = ("bar_jax", "configs", "experiments")


def _scopes(tree):
  """(scope node, the nodes of its own body, nested functions excluded) for the module and every function."""
  def own(node):
    out, todo = [], list(ast.iter_child_nodes(node))
    while todo:
      n = todo.pop()
      out.append(n)
      if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        todo.extend(ast.iter_child_nodes(n))
    return out
  return [(n, own(n)) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef))]


def missing_names(source: str, where: str) -> list[str]:
  """`from <own module> import name` where name is neither an attribute nor a submodule, and `alias.attr` on a
  module imported in the same scope (or at module level) that has no such attribute."""
  import importlib
  import importlib.util

  def has(mod, attr):  # an attribute, or a submodule not imported yet
    return hasattr(mod, attr) or (hasattr(mod, "__path__") and importlib.util.find_spec(f"{mod.__name__}.{attr}"))

  def module(name):
    try:
      return importlib.import_module(name)
    except ImportError:
      return None

  problems, tree = [], ast.parse(source, where)
  top_aliases: dict = {}
  for scope, nodes in _scopes(tree):
    aliases = dict(top_aliases) if not isinstance(scope, ast.Module) else {}
    for n in nodes:
      if isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").split(".")[0] in OWN:
        mod = module(n.module)
        if mod is None:
          problems.append(f"{where}:{n.lineno} no module {n.module}")
          continue
        for a in n.names:
          sub = f"{n.module}.{a.name}"
          if not hasattr(mod, a.name) and hasattr(mod, "__path__") and importlib.util.find_spec(sub):
            aliases[a.asname or a.name] = module(sub)
          elif not hasattr(mod, a.name):
            problems.append(f"{where}:{n.lineno} {n.module} has no {a.name}")
          elif isinstance(getattr(mod, a.name), type(mod)):
            aliases[a.asname or a.name] = getattr(mod, a.name)
      elif isinstance(n, ast.Import):
        for a in n.names:
          if a.name.split(".")[0] in OWN and a.asname:
            aliases[a.asname] = module(a.name)
    stored = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    stored |= {a.arg for n in [scope] if not isinstance(n, ast.Module) for a in n.args.args + n.args.kwonlyargs}
    for name in stored:
      aliases.pop(name, None)
    for n in nodes:
      if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and aliases.get(n.value.id) is not None:
        mod = aliases[n.value.id]
        if not has(mod, n.attr):
          problems.append(f"{where}:{n.lineno} {mod.__name__} has no {n.attr}")
    if isinstance(scope, ast.Module):
      top_aliases = aliases
  return problems


def test_the_name_check_can_fail():
  assert missing_names("from bar_jax.data import domains\ndef f():\n  return domains.resolve('all')\n", "x") == \
      ["x:3 bar_jax.data.domains has no resolve"]
  assert missing_names("def f():\n  from bar_jax.data import capability\n  return capability.resolve('all')\n",
                       "x") == []
  assert missing_names("def f():\n  from bar_jax.evals import no_such_name\n", "x") == \
      ["x:2 bar_jax.evals has no no_such_name"]


def test_every_name_taken_from_the_package_exists():
  """Every `from bar_jax|configs|experiments ... import name` and `module.attr` in bar_jax/, configs/ and
  experiments/ resolves (lazy imports inside functions included)."""
  problems = []
  for top in OWN:
    for dirpath, _, files in os.walk(os.path.join(REPO, top)):
      for f in sorted(files):
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          problems += missing_names(open(path).read(), os.path.relpath(path, REPO))
  assert not problems, "\n".join(problems)
