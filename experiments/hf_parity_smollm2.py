"""HF export parity on the real base model: SmolLM2-135M-Instruct (packaged GGUF) -> bar_jax -> HF dir -> transformers.

  python experiments/hf_parity_smollm2.py [--out experiments/results/hf_parity_smollm2.md]

Exports (1) the dense base as LlamaForCausalLM and (2) a 3-expert MoE built from it (anchor + two perturbed FFN
copies, random router) as MixtralForCausalLM, in the paper's setting (all experts, unnormalised) and with top-2
renormalised; loads each with transformers (CPU torch, float32) and reports the max |logit difference| on real text,
the greedy continuation of both, the export/import times, and whether load_dir gives the params back bit for bit.
Needs torch + transformers (requirements-test.txt).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from bar_jax.io import gguf, hf
from bar_jax.model import transformer

PROMPT = "The capital of France is"
TEXT = ("The Python standard library is very extensive, offering a wide range of facilities. It contains built-in "
        "modules that provide access to system functionality such as file I/O.")


def greedy(next_logits, ids, n):
  for _ in range(n):
    ids = ids + [int(np.argmax(next_logits(ids)))]
  return ids


def moe_from_dense(cfg, params, seed=0):
  """Anchor + two FFN copies scaled by (1 + 0.05 noise), router N(0, 0.5^2 / D): a stand-in for a merged BAR model."""
  rng = np.random.default_rng(seed)
  mlp = params["layers"]["mlp"]
  experts = {}
  for w in ("gate", "up", "down"):
    k = np.asarray(mlp[w]["kernel"])
    experts[w] = np.stack([k] + [k * (1 + 0.05 * rng.standard_normal(k.shape, np.float32)) for _ in range(2)], 1)
  router = (0.5 / np.sqrt(cfg.d_model) * rng.standard_normal((cfg.n_layers, cfg.d_model, 3))).astype(np.float32)
  layers = {k: v for k, v in params["layers"].items() if k != "mlp"}
  layers["moe"] = {"router": {"kernel": router}, "experts": experts}
  return {**params, "layers": layers}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  import torch
  import transformers
  rows = []
  cfg, params, tok = gguf.load()
  params = jax.tree.map(np.asarray, params)
  fwd = jax.jit(transformer.forward, static_argnames=("cfg",))
  text_ids = np.asarray([tok.encode(TEXT)])
  models = [("dense (LlamaForCausalLM)", cfg, params)]
  moe_params = moe_from_dense(cfg, params)
  for top_k, norm in ((0, False), (2, True)):
    mcfg = cfg.replace(ffn="moe", n_experts=3, top_k=top_k, norm_topk=norm).validate()
    models.append((f"MoE E=3 top_k={top_k or 3} norm_topk={norm} (MixtralForCausalLM)", mcfg, moe_params))
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, mcfg, p) in enumerate(models):
      path = os.path.join(tmp, f"m{i}")
      t0 = time.perf_counter()
      hf.save_dir(path, mcfg, p, tok)
      t_save = time.perf_counter() - t0
      t0 = time.perf_counter()
      cfg2, p2, _ = hf.load_dir(path)
      jax.block_until_ready(p2)
      t_load = time.perf_counter() - t0
      same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p)))
      model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
      with torch.no_grad():
        ref = model(torch.tensor(text_ids)).logits.numpy()
        ref_next = lambda ids: model(torch.tensor([ids])).logits[0, -1].numpy()
        hf_text = tok.decode(greedy(ref_next, tok.encode(PROMPT), 8))
      got = np.asarray(fwd(p, text_ids, cfg=mcfg)[0])
      bar_next = lambda ids: np.asarray(fwd(p, np.asarray([ids]), cfg=mcfg)[0][0, -1])
      bar_text = tok.decode(greedy(bar_next, tok.encode(PROMPT), 8))
      diff = float(np.max(np.abs(got - ref)))
      rows.append(f"| {name} | {diff:.2e} | {same} | {t_save:.1f} | {t_load:.1f} | {hf_text!r} | "
                  f"{'same' if hf_text == bar_text else repr(bar_text)} |")
      print(rows[-1], flush=True)
  table = ("| model | max abs logit diff vs transformers | load_dir bit-identical | save_dir s | load_dir s | "
           "transformers greedy | bar_jax greedy |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(f"# HF export parity, SmolLM2-135M-Instruct ({text_ids.shape[1]} tokens of English, float32, CPU)\n\n"
              f"Command: `python experiments/hf_parity_smollm2.py --out {args.out}`\n\n{table}\n")


if __name__ == "__main__":
  main()
