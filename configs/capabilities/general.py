"""General: prose passages of the Python documentation; scored by per-token NLL. It is the general data every other
capability mixes in, so it mixes in nothing itself. Fields: configs/capabilities/template.py."""


def get_config():
  return dict(
      name="general",
      description="English prose (the Python documentation)",
      license="Python documentation (Debian python3.11-doc): PSF License Agreement; code examples Zero-Clause BSD",
      data=dict(source="python_docs"),
      metric=dict(name="nll"),
      general=dict(weight=0.0, capability="general"),
  )
