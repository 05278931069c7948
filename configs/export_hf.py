"""Export a bar_jax artifact to a Hugging Face directory that transformers (and vLLM, TGI, llama.cpp's converter) load.

  python -m bar_jax.train --config=configs/export_hf.py --config.model=runs/moe --workdir=runs/moe_hf

Expected: runs/moe_hf holds config.json (a dense artifact: its family's class, LlamaForCausalLM / Qwen2 / Qwen3 /
Olmo2; an MoE: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM or FlexOlmoForCausalLM, see the table in
bar_jax/io/hf.py), model.safetensors (float32; sharded with an index above max_shard_gb), tokenizer.json +
tokenizer_config.json (the model's chat template) and bar_jax_export.json (the source artifact's fingerprint).
transformers.AutoModelForCausalLM loads it and its logits equal bar_jax's within 1e-4 (tests/test_hf.py,
tests/test_families.py). A Llama-base MoE with top_k < n_experts and norm_topk=False is refused with one line (Mixtral
renormalises the top-k weights): export with norm_topk=True or top_k=0.
"""
import ml_collections

from configs.common import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, positional=["model"], model="")
  c = ml_collections.ConfigDict()
  c.stage = "export_hf"
  c.model = a.model            # the artifact dir to export
  c.max_shard_gb = 5.0          # safetensors shard size (transformers' default)
  c.verify = True               # check the artifact's fingerprints before exporting
  return c
