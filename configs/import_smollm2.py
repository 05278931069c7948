"""Import the packaged SmolLM2-135M-Instruct (GGUF Q4_1 -> float32) as the dense base artifact of a BAR run.

  python -m bar_jax.train --config=configs/import_smollm2.py --workdir=runs/base
  python -m bar_jax.generate --model=runs/base --prompt="What is 2+3?"

Expected (~10 s on 2 CPU cores): runs/base holds manifest.json (kind dense, 30 layers, d=576, 134.5M parameters,
rope_style half, a sha256 fingerprint), params/ (orbax) and tokenizer.json + tokenizer_chat.json (ChatML). The
model then greedily completes "The capital of France is" with " Paris" and answers "What is 2+3?" with
"2 + 3 = 5". Pass a Hugging Face directory or another Llama .gguf as the argument (or --config.source) to import
that instead.
"""
import ml_collections

from configs.common import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, positional=["source"], source="")
  c = ml_collections.ConfigDict()
  c.stage = "import_base"
  c.source = a.source   # "" = the packaged SmolLM2 GGUF; or a .gguf path; or a Hugging Face directory
  c.name = ""            # artifact name in lineages; default: the workdir's basename
  return c
