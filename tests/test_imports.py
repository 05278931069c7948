"""The layering, read from the source with ast (nothing is imported): no import cycle inside bar_jax, no stage
importing another stage, and a functional core (bar_jax/model, bar_jax/transforms) that does no I/O."""
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
