"""The base tokenizer: byte-level BPE round trips, ChatML rendering identical to SmolLM2's own jinja template, and
loss masks that cover exactly the assistant's tokens."""
import json
import string

import pytest

from bar_jax.data.tokenizer import Tokenizer
from bar_jax.errors import BarError

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
    [{"role": "system", "content": "You answer tersely."}, {"role": "user", "content": "Capital of Peru?"},
     {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And of Chile?"},
     {"role": "assistant", "content": "Santiago\n\nIt is also the largest city."}],
    [{"role": "user", "content": "Write a loop."},
     {"role": "assistant", "content": "```python\nfor i in range(10):\n    print(i)\n```"}],
]


def test_real_text_round_trips_and_digits_split(smollm2_tokenizer):
  tok = smollm2_tokenizer
  for text in (json.__doc__, string.__doc__, "naïve café — 日本語, x=  42;\t\n\n end"):
    assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode("12345")) == 5  # Digits(individual_digits=True)
  assert tok.encode("<|im_end|>") == [tok.eot_id]
  assert tok.vocab_size == 49152 and tok.eot_id in tok.eos_ids


@pytest.mark.parametrize("gen", [False, True])
def test_chat_matches_the_models_own_template(smollm2_tokenizer, gen):
  jinja2 = pytest.importorskip("jinja2")
  tok = smollm2_tokenizer
  template = jinja2.Environment().from_string(tok.chat["chat_template"])
  for conv in CONVERSATIONS:
    text, _ = tok.render_chat_text(conv, add_generation_prompt=gen)
    assert text == template.render(messages=conv, add_generation_prompt=gen)
    ids, mask = tok.render_chat(conv, add_generation_prompt=gen)
    assert ids == tok.encode(text) and len(mask) == len(ids)
  assert tok.render_chat_text(CONVERSATIONS[0])[0].startswith("<|im_start|>system\nYou are a helpful AI assistant")


def test_loss_mask_covers_exactly_the_assistant_tokens(smollm2_tokenizer):
  tok = smollm2_tokenizer
  for conv in CONVERSATIONS:
    ids, mask = tok.render_chat(conv)
    trained = [i for i, m in zip(ids, mask) if m]
    expected = "".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")
    assert tok.decode(trained) == expected
    # Every <|im_end|> closing an assistant turn is trained; no <|im_start|> or role header is.
    n_assistant = sum(m["role"] == "assistant" for m in conv)
    assert sum(m for i, m in zip(ids, mask) if i == tok.eot_id) == n_assistant
    assert all(m == 0 for i, m in zip(ids, mask) if i == tok.tok.token_to_id("<|im_start|>"))


def test_format_prompt_ends_with_the_assistant_header(smollm2_tokenizer):
  tok = smollm2_tokenizer
  ids = tok.format_prompt("Hi", system="Be brief.")
  assert tok.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                            "<|im_start|>assistant\n"
  with pytest.raises(BarError):
    tok.render_chat([{"role": "user", "text": "no content key"}])


def test_save_load_round_trip(smollm2_tokenizer, tmp_path):
  tok = smollm2_tokenizer
  tok.save(str(tmp_path))
  again = Tokenizer.load(str(tmp_path))
  conv = CONVERSATIONS[1]
  assert again.render_chat(conv) == tok.render_chat(conv)
  assert (again.eos_ids, again.pad_id, again.eot_id) == (tok.eos_ids, tok.pad_id, tok.eot_id)
  with pytest.raises(BarError, match="no tokenizer"):
    Tokenizer.load(str(tmp_path / "missing"))
