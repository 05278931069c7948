"""Hugging Face import/export against transformers itself (CPU torch, test-only): logits parity and bit-identity."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from bar_jax.errors import BarError
from bar_jax.io import hf
from bar_jax.model import transformer
from bar_jax.model.config import tiny
from numerics import ulps

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 12))
_forward = jax.jit(transformer.forward, static_argnames=("cfg",))
# torch and XLA run the same float32 model with their own summation orders (D=32, F=64 and attention sums, softmax,
# RMSNorm): logits of magnitude up to ~5 agree to a few hundred ulps (1 ulp of 5 = 6e-7), so 1e-4.
HF_TOL = 1e-4


def bar_logits(cfg, params):
  return np.asarray(_forward(params, TOKENS, cfg=cfg)[0])


def hf_logits(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def hf_llama(path, tie):
  torch.manual_seed(0)
  c = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                               max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                               tie_word_embeddings=tie, initializer_range=0.2)
  model = transformers.LlamaForCausalLM(c)
  with torch.no_grad():  # the norm scales start at one: make them random so a mix-up of the two norms shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(path)
  return model.state_dict()


def random_params(cfg, seed=1):
  """Every leaf random (norm scales near one, LoRA B nonzero), drawn with numpy: no jax compiles."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    if "scale" in jax.tree_util.keystr(path):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, transformer.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))


def assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("tie", [True, False])
def test_import_transformers_llama_matches_logits(tmp_path, tie):
  state = hf_llama(tmp_path / "m", tie)
  cfg, params, tok = hf.load_dir(tmp_path / "m")
  assert tok is None
  assert cfg == tiny(vocab_size=128, tie_embeddings=tie, rms_eps=1e-5)
  np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["q"]["kernel"][1]),
                                state["model.layers.1.self_attn.q_proj.weight"].numpy().T)
  got = bar_logits(cfg, params)
  assert np.max(np.abs(got - hf_logits(tmp_path / "m"))) <= HF_TOL


def test_dense_export_round_trip(tmp_path):
  cfg = tiny(vocab_size=128, tie_embeddings=False, rms_eps=1e-5)
  params = random_params(cfg)
  hf.save_dir(tmp_path / "out", cfg, params)
  assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
  assert np.max(np.abs(bar_logits(cfg, params) - hf_logits(tmp_path / "out"))) <= HF_TOL
  cfg2, params2, _ = hf.load_dir(tmp_path / "out")
  assert cfg2 == cfg
  assert_bit_identical(params2, params)
  with pytest.raises(BarError, match="already exists"):  # never overwrites
    hf.save_dir(tmp_path / "out", cfg, params)


def test_sharded_export_loads_into_sharded_arrays(tmp_path):
  cfg = tiny(vocab_size=128, tie_embeddings=True, rms_eps=1e-5)
  params = random_params(cfg, seed=3)
  hf.save_dir(tmp_path / "out", cfg, params, max_shard_bytes=20_000)
  files = sorted(os.listdir(tmp_path / "out"))
  assert hf.INDEX_FILE in files and len([f for f in files if f.endswith(".safetensors")]) > 2
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec

  def shardings(cfg):  # split every leaf's last axis over the 8 devices, so each device reads only its block
    return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, P(*[None] * (len(s) - 1), "x")),
                        transformer.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))

  cfg2, params2, _ = hf.load_dir(tmp_path / "out", shardings=shardings)
  assert cfg2 == cfg
  q = params2["layers"]["attn"]["q"]["kernel"]
  assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (2, 32, 4)
  assert_bit_identical(params2, params)
  np.testing.assert_allclose(hf_logits(tmp_path / "out"), bar_logits(cfg, params), atol=HF_TOL, rtol=0)


@pytest.mark.parametrize("top_k,norm_topk,kind", [(3, False, "ffn"), (2, True, "ffn"), (3, False, "lora")])
def test_moe_export_matches_mixtral(tmp_path, top_k, norm_topk, kind):
  lora = dict(lora_rank=4, lora_alpha=8.0) if kind == "lora" else {}
  cfg = tiny(vocab_size=128, rms_eps=1e-5, ffn="moe", n_experts=3, top_k=top_k, norm_topk=norm_topk,
             expert_kind=kind, **lora)
  params = random_params(cfg, seed=5)
  hf.save_dir(tmp_path / "out", cfg, params)
  assert json.load(open(tmp_path / "out" / "config.json"))["architectures"] == ["MixtralForCausalLM"]
  want = bar_logits(cfg, params)
  assert np.max(np.abs(want - hf_logits(tmp_path / "out"))) <= HF_TOL
  cfg2, params2, _ = hf.load_dir(tmp_path / "out")
  assert (cfg2.ffn, cfg2.n_experts, cfg2.k, cfg2.expert_kind) == ("moe", 3, cfg.k, "ffn")
  if kind == "ffn":
    assert cfg2 == cfg
    assert_bit_identical(params2, params)
  else:  # exported materialised: anchor and router bit-identical, expert i = anchor + a_i b_i * alpha / r
    got = params2["layers"]["moe"]["experts"]
    assert_bit_identical(params2["layers"]["moe"]["router"], params["layers"]["moe"]["router"])
    lora = params["layers"]["moe"]["lora"]
    for name in ("gate", "up", "down"):
      anchor = np.asarray(params["layers"]["moe"]["experts"][name])
      np.testing.assert_array_equal(np.asarray(got[name][:, :1]), anchor)
      delta = np.einsum("leir,lero->leio", np.asarray(lora[name]["a"]), np.asarray(lora[name]["b"])) * 2.0
      # A rank-4 sum and one add in float32 on either side: a few ulps of the largest entry.
      np.testing.assert_allclose(np.asarray(got[name][:, 1:]), anchor + delta, rtol=0, atol=ulps(anchor + delta, 8))
      assert np.abs(delta).max() > 1e-3  # the adapters are not the identity
    # Stored vs on-the-fly materialised experts (each a few ulps apart) through two programs: tens of ulps of a logit.
    np.testing.assert_allclose(bar_logits(cfg2, params2), want, atol=ulps(want, 64), rtol=0)


def test_import_fused_mixtral_layout(tmp_path):
  """transformers 5 keeps Mixtral experts fused in memory (gate_up_proj [E, 2F, D]); a dir saved from that
  state_dict (not via save_pretrained's legacy renaming) loads too."""
  from safetensors.torch import save_file
  torch.manual_seed(0)
  c = transformers.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=3,
                                 num_experts_per_tok=2, rms_norm_eps=1e-5, max_position_embeddings=128,
                                 initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
  model = transformers.MixtralForCausalLM(c).eval()
  (tmp_path / "m").mkdir()
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m" / "model.safetensors",
            metadata={"format": "pt"})
  c.save_pretrained(tmp_path / "m")
  assert "model.layers.0.mlp.experts.gate_up_proj" in model.state_dict()
  cfg, params, _ = hf.load_dir(tmp_path / "m")
  assert (cfg.n_experts, cfg.top_k, cfg.norm_topk, cfg.tie_embeddings) == (3, 2, True, False)
  with torch.no_grad():
    want = model(torch.tensor(TOKENS)).logits.numpy()
  assert np.max(np.abs(bar_logits(cfg, params) - want)) <= HF_TOL


def test_moe_export_refuses_unnormalised_top_k(tmp_path):
  cfg = tiny(ffn="moe", n_experts=3, top_k=2, norm_topk=False)
  with pytest.raises(BarError, match="norm_topk"):
    hf.save_dir(tmp_path / "out", cfg, random_params(cfg))
  assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == []


def chatml_tokenizer():
  import tokenizers
  from bar_jax.data.tokenizer import Tokenizer
  vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz\u0120\u010a")}  # byte-level letters, space, newline
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
  return Tokenizer(tok, {"format": "chatml", "default_system": None, "chat_template": "", "eos_token_id": 30,
                         "pad_token_id": 30})


def test_export_stage_from_artifact(tmp_path):
  from bar_jax import train
  from bar_jax.io import artifact
  import configs.export_hf
  cfg = tiny(vocab_size=128, tie_embeddings=True, rms_eps=1e-5)
  params = random_params(cfg, seed=7)
  tok = chatml_tokenizer()
  artifact.write(str(tmp_path / "art"), params, {"kind": "dense", "model": cfg.to_dict()}, tok)
  out = train.run(configs.export_hf.get_config(str(tmp_path / "art")), str(tmp_path / "hf"))
  assert out == str(tmp_path / "hf")
  assert json.load(open(tmp_path / "hf" / hf.PROVENANCE_FILE))["fingerprint"] == artifact.fingerprint(params)
  np.testing.assert_allclose(hf_logits(out), bar_logits(cfg, params), atol=HF_TOL, rtol=0)
  cfg2, params2, tok2 = hf.load_dir(out)
  assert cfg2 == cfg
  assert_bit_identical(params2, params)
  text = "<|im_start|>ab cd\n<|im_end|>"
  assert tok2.encode(text) == tok.encode(text) and tok2.eot_id == tok.eot_id == 29
  fast = transformers.AutoTokenizer.from_pretrained(out)
  assert fast.encode(text) == tok.encode(text) and fast.eos_token == "<|endoftext|>"
  shutil.copytree(out, tmp_path / "plain_hf")  # a HF dir without bar_jax's chat file: tokenizer_config.json is read
  os.remove(tmp_path / "plain_hf" / "tokenizer_chat.json")
  tok3 = hf.load_dir(tmp_path / "plain_hf")[2]
  assert tok3.encode(text) == tok.encode(text) and tok3.chat["eos_token_id"] == 30 and tok3.eot_id == 29
  # The workdir contract: the same export returns the directory as it is, another is refused with one line.
  assert train.run(configs.export_hf.get_config(str(tmp_path / "art")), out) == out
  smaller = configs.export_hf.get_config(str(tmp_path / "art"))
  smaller.max_shard_gb = 1.0
  with pytest.raises(BarError, match="another export_hf run"):
    train.run(smaller, out)


def _one_line_error(fn, match):
  with pytest.raises(BarError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)


def test_bad_input_raises_one_line_bar_error(tmp_path):
  hf_llama(tmp_path / "good", tie=True)
  shutil.copytree(tmp_path / "good", tmp_path / "noconfig")
  os.remove(tmp_path / "noconfig" / "config.json")
  _one_line_error(lambda: hf.load_dir(tmp_path / "noconfig"), "config.json is missing")

  gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2))
  gpt2.save_pretrained(tmp_path / "gpt2")
  _one_line_error(lambda: hf.load_dir(tmp_path / "gpt2"), "GPT2LMHeadModel.*not supported")

  shutil.copytree(tmp_path / "good", tmp_path / "truncated")
  f = tmp_path / "truncated" / "model.safetensors"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  _one_line_error(lambda: hf.load_dir(tmp_path / "truncated"), "model.safetensors.*re-download")

  shutil.copytree(tmp_path / "good", tmp_path / "mismatch")
  c = json.load(open(tmp_path / "mismatch" / "config.json"))
  c["intermediate_size"] = 96
  json.dump(c, open(tmp_path / "mismatch" / "config.json", "w"))
  _one_line_error(lambda: hf.load_dir(tmp_path / "mismatch"),
                  r"mlp\.\w+_proj\.weight has shape \[\d+, \d+\], config.json implies")

  _one_line_error(lambda: hf.load_dir(tmp_path / "nowhere"), "not a directory")
