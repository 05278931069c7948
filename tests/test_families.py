"""Model families (Llama 3, Qwen 2, Qwen 3, OLMo 2) against transformers itself (CPU torch, test-only).

Each tiny model is built and saved by transformers with every weight random (norm scales, biases included), so a
mix-up of two norms or a dropped bias shows in the logits. Tolerance: float32 logits of magnitude ~1-10 after two
layers of 32-wide matmuls differ between XLA and torch by a few ulp per accumulated term (~1e-6 relative, ~1e-5
absolute); 1e-4 is that with a 10x margin, and a missing feature moves the logits by >1e-2 (asserted below).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bar_jax import pytree, sharding
from bar_jax.errors import BarError
from bar_jax.io import hf
from bar_jax.model import transformer
from bar_jax.model.config import Compute
from bar_jax.stages import loop
from bar_jax.transforms import freeze, merge, upcycle, upgrade

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 12))
ATOL = 1e-4  # float32 parity with torch (module docstring)
_forward = jax.jit(transformer.forward, static_argnames=("cfg",))
_cached = jax.jit(transformer.forward_cached, static_argnames=("cfg",))

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128, initializer_range=0.3,
              tie_word_embeddings=False)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # every wavelength band is hit
FAMILIES = {
    "llama3": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **COMMON, head_dim=8, rope_parameters=LLAMA3_ROPE)),
        dict(rope_type="llama3", rope_factor=8.0, rope_original_max_len=64)),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1e4})), dict(qkv_bias=True)),
    "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **COMMON, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4})), dict(qk_norm="head")),
    "olmo2": (lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, pad_token_id=None,
        eos_token_id=None, bos_token_id=None)), dict(qk_norm="proj", norm_position="post")),
}
MOE_CLASS = {"llama3": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM",
             "olmo2": "FlexOlmoForCausalLM"}


def save_hf_family(name, path):
  torch.manual_seed(0)
  model = FAMILIES[name][0]()
  with torch.no_grad():  # norm scales start at one and biases at zero: make both random
    for pname, p in model.named_parameters():
      if "norm" in pname:
        p.uniform_(0.5, 1.5)
      elif pname.endswith("bias"):
        p.normal_(0.0, 0.5)
  # OLMo 2 is saved in shards (an index + several files), the others as one file: import reads both.
  model.save_pretrained(path, max_shard_size="40KB" if name == "olmo2" else "5GB")
  return model.eval()


def torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def hf_logits(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  return torch_logits(model), type(model).__name__


def bar_logits(cfg, params):
  return np.asarray(_forward(params, TOKENS, cfg=cfg)[0])


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  """(name, HF directory, torch model) for each family, saved once per module."""
  path = tmp_path_factory.mktemp(request.param) / "hf"
  return request.param, str(path), save_hf_family(request.param, path)


def test_import_matches_transformers_and_kv_cache_matches_full_forward(family):
  name, path, model = family
  cfg, params, _ = hf.load_dir(path)
  for field, value in FAMILIES[name][1].items():
    assert getattr(cfg, field) == value, field
  assert (name == "olmo2") == os.path.isfile(os.path.join(path, hf.INDEX_FILE))
  # Read straight into sharded arrays (each device its own block), the new leaves placed by their logical axes.
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
  _, sharded, _ = hf.load_dir(path, shardings=lambda c: transformer.param_shardings(c, mesh))
  assert jax.tree.structure(sharded) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  want = torch_logits(model)
  got = bar_logits(cfg, params)
  assert 1.0 < np.abs(want).max() < 30.0
  assert np.max(np.abs(got - want)) <= ATOL

  # The feature matters: switching it off moves the logits far beyond the tolerance.
  plain = {"rope_type": "default", "qkv_bias": False, "qk_norm": "none", "norm_position": "pre"}
  off = {k: plain[k] for k in FAMILIES[name][1] if k in plain}
  cfg_off = cfg.replace(**off)
  params_off = params
  if cfg.qkv_bias or cfg.qk_norm != "none":
    attn = {k: ({kk: vv for kk, vv in v.items() if kk != "bias"} if isinstance(v, dict) else v)
            for k, v in params["layers"]["attn"].items() if k not in ("q_norm", "k_norm")}
    params_off = {**params, "layers": {**params["layers"], "attn": attn}}
  assert np.max(np.abs(bar_logits(cfg_off, params_off) - want)) > 1e-2

  # KV cache: prefill 7 tokens, then decode the other 5 one by one; every step equals the full forward's row.
  # Same float32 program up to the cache's masked extra slots (exact zeros after softmax): 1e-5.
  cache = transformer.init_cache(cfg, TOKENS.shape[0], 16)
  logits, cache = _cached(params, TOKENS[:, :7], cache, cfg=cfg)
  steps = [logits]
  for t in range(7, TOKENS.shape[1]):
    logits, cache = _cached(params, TOKENS[:, t:t + 1], cache, cfg=cfg)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), got, atol=1e-5, rtol=0)


def _train_branch(cfg, params, seed, steps=2):
  """A few AdamW steps of the branch's own training step: everything trains but the anchor expert (slot 0)."""
  part = freeze.make_partition(params, cfg, [".*"], (0,))
  trainable, frozen = freeze.split(params, part)
  tx = optax.adam(3e-2)
  step = jax.jit(loop.make_step(loop.lm_loss(cfg), tx, part, accum=1))
  opt_state = tx.init(trainable)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    x = rng.integers(0, 64 * (seed + 1), (1, 4, 17)).astype(np.int32) % cfg.vocab_size
    batch = {"inputs": x[..., :-1], "targets": x[..., 1:], "mask": np.ones((1, 4, 16), np.float32),
             "segment_ids": np.ones((1, 4, 16), np.int32), "positions": np.tile(np.arange(16), (1, 4, 1))}
    trainable, opt_state, _ = step(trainable, opt_state, frozen, batch)
  return jax.tree.map(np.asarray, freeze.join(trainable, frozen, part))


def _export_and_compare(tmp_path, tag, cfg, params, want_class):
  out = hf.save_dir(tmp_path / tag, cfg, params, provenance={"artifact": tag})
  hf_config = json.load(open(os.path.join(out, "config.json")))
  assert hf_config["architectures"] == [want_class]
  assert json.load(open(os.path.join(out, hf.PROVENANCE_FILE))) == {"artifact": tag}
  got, cls = hf_logits(out)
  assert cls == want_class
  want = bar_logits(cfg, params)
  assert np.max(np.abs(got - want)) <= ATOL, (tag, np.max(np.abs(got - want)))
  return out


def test_upcycle_train_merge_export_matches_transformers(family, tmp_path):
  name, path, _ = family
  cfg, params, _ = hf.load_dir(path)
  params = jax.tree.map(np.asarray, params)
  dense_cls = type(family[2]).__name__
  _export_and_compare(tmp_path, "dense", cfg, params, dense_cls)

  branch0, bcfg = upcycle.upcycle(params, cfg)
  np.testing.assert_allclose(bar_logits(bcfg, branch0), bar_logits(cfg, params), atol=1e-5, rtol=0)
  branches = [_train_branch(bcfg, branch0, seed) for seed in (0, 1)]
  for key in ("q_norm", "q"):  # the new leaves trained, differently per branch
    if key in branches[0]["layers"]["attn"]:
      leaf = lambda b: b["layers"]["attn"][key].get("scale", b["layers"]["attn"][key].get("bias"))
      if leaf(branches[0]) is not None:
        assert np.abs(leaf(branches[0]) - leaf(branches[1])).max() > 1e-3
  _export_and_compare(tmp_path, "branch", bcfg, branches[0], MOE_CLASS[name])

  # Llama bases export to Mixtral, which renormalises top-k: an unnormalised top-2 of 3 is refused (one line,
  # nothing written); the other families' MoE classes express it.
  top_k = 0 if name == "llama3" else 2
  merged, mcfg = merge.merge(params, branches, [bcfg, bcfg], rule="average", top_k=top_k, norm_topk=False)
  for leaf in ("q_norm", "k_norm"):
    if leaf in merged["layers"]["attn"]:  # shared leaves are the mean of the base and the branches
      np.testing.assert_allclose(merged["layers"]["attn"][leaf]["scale"],
                                 (params["layers"]["attn"][leaf]["scale"] + branches[0]["layers"]["attn"][leaf]["scale"]
                                  + branches[1]["layers"]["attn"][leaf]["scale"]) / 3, rtol=1e-6)
  _export_and_compare(tmp_path, "merged", mcfg, merged, MOE_CLASS[name])
  if name == "llama3":
    bad = mcfg.replace(top_k=2)
    with pytest.raises(BarError, match="norm_topk") as e:
      hf.save_dir(tmp_path / "refused", bad, merged)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "refused")

  # Upgrade: adding a branch's expert carries the new leaves along untouched.
  grown, gcfg = upgrade.add(merged, mcfg, branches[1], bcfg)
  assert gcfg.n_experts == 4
  for p, x in pytree.as_flat(merged).items():
    if not p.startswith("layers/moe/"):
      np.testing.assert_array_equal(pytree.as_flat(grown)[p], x)

  # And the export reads back as the same model (the MoE classes round-trip through import too).
  cfg2, params2, _ = hf.load_dir(tmp_path / "merged")
  assert cfg2 == mcfg.replace(top_k=mcfg.k, norm_topk=cfg2.norm_topk)
  for x, y in zip(jax.tree.leaves(params2), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(x), y)


@pytest.mark.parametrize("dispatch", ["dropless", "expert_parallel"])
def test_family_moe_runs_on_every_dispatch_path(dispatch):
  """OLMo 2 + Qwen features together on an 8-device mesh: each dispatch path equals the dense reference."""
  from bar_jax.model.config import tiny
  cfg = tiny(ffn="moe", n_experts=4, top_k=2, qkv_bias=True, qk_norm="proj", norm_position="post",
             rope_type="llama3", rope_factor=8.0, rope_original_max_len=64)
  params = transformer.init_params(cfg, jax.random.key(0))
  params = jax.tree_util.tree_map_with_path(  # biases and norm scales random, not zeros and ones
      lambda p, x: x + 0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if ("bias" in str(p) or "scale" in str(p)) else x, params)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 16)))
  want = np.asarray(_forward(params, tokens, cfg=cfg)[0])
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
  compute = Compute(dispatch=dispatch)
  ps = transformer.param_shardings(cfg, mesh)
  f = jax.jit(lambda p, t: transformer.forward(p, t, cfg, compute=compute, mesh=mesh)[0],
              in_shardings=(ps, sharding.batch_sharding(mesh)))
  got = np.asarray(f(jax.device_put(params, ps), jax.device_put(tokens, sharding.batch_sharding(mesh))))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # same fp32 math, another summation order


def _one_line(fn, match):
  with pytest.raises(BarError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)
  return str(e.value)


def test_unsupported_architecture_or_setting_is_one_line(tmp_path):
  gemma = transformers.GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  transformers.GemmaForCausalLM(gemma).save_pretrained(tmp_path / "gemma")
  msg = _one_line(lambda: hf.load_dir(tmp_path / "gemma"), "GemmaForCausalLM.*not supported")
  assert all(a in msg for a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Olmo2ForCausalLM"))

  (tmp_path / "yarn").mkdir()
  c = transformers.LlamaConfig(**COMMON, head_dim=8, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                                      "factor": 4.0})
  json.dump({**c.to_dict(), "architectures": ["LlamaForCausalLM"]}, open(tmp_path / "yarn" / "config.json", "w"))
  _one_line(lambda: hf.load_dir(tmp_path / "yarn"), r"rope_type='yarn' \(supported: 'default', 'llama3'\)")

  from bar_jax.model.config import tiny
  odd = tiny(qkv_bias=True, qk_norm="head")  # Qwen 2 biases with Qwen 3 norms: no transformers class has both
  params = transformer.init_params(odd, jax.random.key(0))
  msg = _one_line(lambda: hf.save_dir(tmp_path / "out", odd, params), "no Hugging Face class")
  assert "Qwen3 (qk_norm='head')" in msg and not os.path.exists(tmp_path / "out")
  with pytest.raises(ValueError, match="qk_norm='rms'"):
    tiny(qk_norm="rms")


# Chat templates shaped like the families' own (written for this test): Llama 3 headers + <|eot_id|>; OLMo 2's
# <|user|> / <|assistant|> turns closed by the eos token; Qwen's ChatML with a default system message.
TEMPLATES = {
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
               " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}", "<|eot_id|>"),
    "olmo2": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>\\n' + "
              "m['content'] + eos_token }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% else %}{{ '<|' + m['role'] + "
              "'|>\\n' + m['content'] + '\\n' }}{% endif %}{% if loop.last and add_generation_prompt %}"
              "{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}", "<|endoftext|>"),
    "qwen": ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful bot.<|im_end|>\\n' }}"
             "{% endif %}{% for m in messages %}"
             "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}", "<|im_end|>"),
}
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|endoftext|>",
            "<|user|>", "<|assistant|>", "<|system|>", "<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_chat_template_from_tokenizer_config(tmp_path, kind):
  import tokenizers
  letters = "abcdefghijklmnopqrstuvwxyz0123456789.?!\u0120\u010a"  # byte-level letters, digits, space, newline
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(letters)}, merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(SPECIALS)
  (tmp_path / "tok").mkdir()
  tok.save(str(tmp_path / "tok" / "tokenizer.json"))
  template, eot = TEMPLATES[kind]
  json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "bos_token": "<|begin_of_text|>",
             "eos_token": "<|endoftext|>", "pad_token": None}, open(tmp_path / "tok" / "tokenizer_config.json", "w"))
  ours = hf._load_tokenizer(str(tmp_path / "tok"))
  assert ours.chat["format"] == "template" and ours.eot_id == tok.token_to_id(eot)
  assert ours.eot_id in ours.eos_ids and tok.token_to_id("<|endoftext|>") in ours.eos_ids

  messages = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "what is two plus two?"},
              {"role": "assistant", "content": "four."}, {"role": "user", "content": "and four"},
              {"role": "assistant", "content": "four"}]  # the last reply also occurs in the user turn before it
  reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  for msgs, gen in ((messages, False), (messages[1:4], True)):
    ids, mask = ours.render_chat(msgs, add_generation_prompt=gen)
    want = reference.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"]
    assert ids == list(want)
    # The mask covers exactly each assistant reply and its end-of-turn token, nothing else.
    trained = [i for i, m in zip(ids, mask) if m]
    replies = "".join(m["content"] + eot for m in msgs if m["role"] == "assistant")
    assert ours.decode(trained) == replies
  assert ours.format_prompt("hi")[-1] != ours.eot_id  # ends with the assistant header, ready to generate

  # Saved with an export and read back (bar_jax's own chat file), the template survives.
  ours.save(str(tmp_path / "saved"))
  from bar_jax.data.tokenizer import Tokenizer
  again = Tokenizer.load(str(tmp_path / "saved"))
  assert again.render_chat(messages) == ours.render_chat(messages)
