"""The base model's tokenizer (a `tokenizers.Tokenizer`) plus its ChatML chat format and loss masks.

Built once from GGUF metadata (byte-level BPE, digits split one by one, special tokens kept whole), then saved with
every artifact as tokenizer.json + tokenizer_chat.json, so nothing later needs the GGUF file again.

The chat format follows SmolLM2's own jinja template (stored verbatim in tokenizer_chat.json):
  [<|im_start|>system\n{default system}<|im_end|>\n]   when the first message is not a system message
  <|im_start|>{role}\n{content}<|im_end|>\n             per message
  <|im_start|>assistant\n                               with add_generation_prompt
The whole conversation is rendered to one string and tokenised in one pass (so the ids are exactly what the model
sees at inference); the loss mask comes from character offsets: 1 on assistant content and its closing <|im_end|>.

A model imported from a Hugging Face directory keeps its own template instead (chat format "template": Llama 3,
Qwen 2.5 / 3, OLMo 2): the jinja chat_template of its tokenizer_config.json is rendered as transformers renders it
(sandboxed, trim_blocks + lstrip_blocks), and the loss covers each assistant message's content, found verbatim in
the rendering, through the end-of-turn token that follows it (read off a probe rendering at load: <|eot_id|>,
<|im_end|>, OLMo 2's eos ...).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from bar_jax.errors import BarError

TOKENIZER_FILE = "tokenizer.json"
CHAT_FILE = "tokenizer_chat.json"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_SPECIAL_TOKEN_TYPE = 3  # GGUF token_type for control tokens
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.S)


def _field(fields: dict[str, Any], name: str, default: Any = None) -> Any:
  """A GGUF metadata value, from a gguf.GGUFReader's `fields` (ReaderField) or an already-decoded dict."""
  if name not in fields:
    return default
  value = fields[name]
  return value.contents() if hasattr(value, "contents") else value


class Tokenizer:
  """Byte-level BPE tokenizer with the base model's ChatML format."""

  def __init__(self, tok: tokenizers.Tokenizer, chat: dict[str, Any]):
    self.tok = tok
    self.chat = dict(chat)
    if self.chat.get("format", "chatml") == "template":
      self._template = _compile_template(self.chat.get("chat_template") or "")
      eot = self.chat.get("eot_token") or _find_eot(self._template, self.chat, tok)
      self.chat["eot_token"] = eot
      self._im_end = self._special_id(eot)
    else:
      self._template = None
      self._im_start = self._special_id(IM_START)
      self._im_end = self._special_id(IM_END)

  @classmethod
  def from_hf_template(cls, tok: tokenizers.Tokenizer, template: str, bos_token: str | None, eos_token: str | None,
                       pad_token: str | None = None) -> "Tokenizer":
    """A Hugging Face tokenizer with its own jinja chat template (tokenizer_config.json's chat_template)."""
    ids = {k: (None if t is None else tok.token_to_id(t)) for k, t in (("eos", eos_token), ("pad", pad_token))}
    chat = {"format": "template", "chat_template": template, "bos_token": bos_token, "eos_token": eos_token,
            "eos_token_id": ids["eos"], "pad_token_id": ids["pad"] if ids["pad"] is not None else ids["eos"],
            "default_system": None}
    return cls(tok, chat)

  # -- construction ------------------------------------------------------------------------------------------------

  @classmethod
  def from_gguf(cls, fields: dict[str, Any]) -> "Tokenizer":
    model = _field(fields, "tokenizer.ggml.model")
    if model != "gpt2":
      raise BarError(f"GGUF tokenizer model {model!r} is not supported; use a byte-level BPE ('gpt2') model")
    tokens = list(_field(fields, "tokenizer.ggml.tokens"))
    types = list(_field(fields, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(fields, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == _SPECIAL_TOKEN_TYPE]
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    template = _field(fields, "tokenizer.chat_template", "") or ""
    m = _DEFAULT_SYSTEM.search(template)
    eos = _field(fields, "tokenizer.ggml.eos_token_id")
    pad = _field(fields, "tokenizer.ggml.padding_token_id", eos)
    chat = {"format": "chatml", "default_system": m.group(1) if m else None, "chat_template": template,
            "eos_token_id": None if eos is None else int(eos), "pad_token_id": None if pad is None else int(pad)}
    return cls(tok, chat)

  @classmethod
  def load(cls, directory: str) -> "Tokenizer":
    path, chat_path = os.path.join(directory, TOKENIZER_FILE), os.path.join(directory, CHAT_FILE)
    if not (os.path.isfile(path) and os.path.isfile(chat_path)):
      raise BarError(f"no tokenizer in {directory}: expected {TOKENIZER_FILE} and {CHAT_FILE}; "
                     "re-run the stage that wrote this artifact")
    with open(chat_path) as f:
      chat = json.load(f)
    return cls(tokenizers.Tokenizer.from_file(path), chat)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self.tok.save(os.path.join(directory, TOKENIZER_FILE))
    with open(os.path.join(directory, CHAT_FILE), "w") as f:
      json.dump({**self.chat, "special_ids": {"eot": self.eot_id, "eos": self.eos_ids, "pad": self.pad_id}}, f,
                indent=1)

  # -- ids ---------------------------------------------------------------------------------------------------------

  def _special_id(self, token: str) -> int:
    i = self.tok.token_to_id(token)
    if i is None:
      if self._template is not None:
        raise BarError(f"tokenizer has no {token} token, which its chat template ends turns with; "
                       "re-download tokenizer.json with the model")
      raise BarError(f"tokenizer has no {token} token: this is not a ChatML tokenizer; import a ChatML base model")
    return i

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  @property
  def eot_id(self) -> int:
    """End of a chat turn (<|im_end|>, or the token the model's own template ends assistant turns with)."""
    return self._im_end

  @property
  def eos_ids(self) -> list[int]:
    """Ids that stop generation: end of turn and the model's end-of-text token."""
    ids = [self._im_end]
    eos = self.chat.get("eos_token_id")
    endoftext = self.tok.token_to_id("<|endoftext|>")
    for i in (eos, endoftext):
      if i is not None and i not in ids:
        ids.append(int(i))
    return ids

  @property
  def pad_id(self) -> int:
    pad = self.chat.get("pad_token_id")
    return self._im_end if pad is None else int(pad)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  # -- chat --------------------------------------------------------------------------------------------------------

  def render_chat_text(self, messages: Sequence[dict[str, str]],
                       add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The template's string, and the character spans the loss covers (assistant content + its <|im_end|>)."""
    for i, msg in enumerate(messages):
      if set(msg) - {"role", "content"} or "role" not in msg or "content" not in msg:
        raise BarError(f"chat message {i} has keys {sorted(msg)}: each message needs exactly 'role' and 'content'")
    if self._template is not None:
      return self._render_template(messages, add_generation_prompt)
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def emit(s: str, trained: bool = False):
      nonlocal pos
      parts.append(s)
      if trained:
        spans.append((pos, pos + len(s)))
      pos += len(s)

    for i, msg in enumerate(messages):
      if i == 0 and msg["role"] != "system" and self.chat.get("default_system") is not None:
        emit(f"{IM_START}system\n{self.chat['default_system']}{IM_END}\n")
      assistant = msg["role"] == "assistant"
      emit(f"{IM_START}{msg['role']}\n")
      emit(msg["content"] + IM_END, trained=assistant)
      emit("\n")
    if add_generation_prompt:
      emit(f"{IM_START}assistant\n")
    return "".join(parts), spans

  def _render_template(self, messages, add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    text = _render(self._template, self.chat, messages, add_generation_prompt)
    eot = self.chat["eot_token"]
    spans, cursor = [], 0
    for i, msg in enumerate(messages):
      if msg["role"] != "assistant":  # step past it, so a short reply is not found inside an earlier message
        found = text.find(msg["content"], cursor)
        cursor = cursor if found < 0 else found + len(msg["content"])
        continue
      start = text.find(msg["content"], cursor)
      end = text.find(eot, start + len(msg["content"])) if start >= 0 else -1
      if end < 0 or text[start + len(msg["content"]):end].strip():
        raise BarError(f"the model's chat template does not render assistant message {i} verbatim followed by {eot}; "
                       "the loss mask cannot be placed: train on plain text (kind='lm') or fix the template")
      spans.append((start, end + len(eot)))
      cursor = end + len(eot)
    return text, spans

  def render_chat(self, messages: Sequence[dict[str, str]],
                  add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss_mask): ChatML ids of the whole conversation; mask 1 exactly on assistant content + <|im_end|>."""
    text, spans = self.render_chat_text(messages, add_generation_prompt)
    enc = self.tok.encode(text, add_special_tokens=False)
    mask = []
    span_i = 0
    for start, _ in enc.offsets:
      while span_i < len(spans) and start >= spans[span_i][1]:
        span_i += 1
      mask.append(int(span_i < len(spans) and spans[span_i][0] <= start < spans[span_i][1]))
    return enc.ids, mask

  def format_prompt(self, user_text: str, system: str | None = None) -> list[int]:
    """Prompt ids for generation: (system +) one user turn, then the assistant header."""
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": user_text})
    return self.render_chat(messages, add_generation_prompt=True)[0]


# ----------------------------------------------------------------------------------------------------------------
# A Hugging Face jinja chat template, rendered the way transformers renders it.

def _compile_template(template: str):
  if not template:
    raise BarError("the tokenizer has no chat_template; import a model directory whose tokenizer_config.json has one")
  import jinja2
  from jinja2 import ext, sandbox

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
  env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateError as e:
    raise BarError(f"the chat_template does not compile ({e}); fix tokenizer_config.json") from None


def _render(template, chat: dict[str, Any], messages, add_generation_prompt: bool) -> str:
  import jinja2
  try:
    return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                           bos_token=chat.get("bos_token") or "", eos_token=chat.get("eos_token") or "")
  except jinja2.exceptions.TemplateError as e:
    raise BarError(f"the model's chat template refused this conversation ({e}); fix the messages") from None


def _find_eot(template, chat: dict[str, Any], tok: tokenizers.Tokenizer) -> str:
  """The special token the template writes right after an assistant message's content (its end of turn)."""
  probe = "bar_jax_probe_reply"
  text = _render(template, chat, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], False)
  after = text[text.find(probe) + len(probe):] if probe in text else ""
  specials = sorted((t.content for t in tok.get_added_tokens_decoder().values() if t.special), key=len, reverse=True)
  for t in specials:
    if after.startswith(t):
      return t
  raise BarError(f"the chat template ends an assistant turn with {after[:20]!r}, not a special token; the loss "
                 "mask needs one: fix the template or train on plain text (kind='lm')")
