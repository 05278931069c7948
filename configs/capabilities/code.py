"""Code: the Python standard library's documented functions, signature + docstring -> body; scored by the NLL of
held-out bodies (no sandbox to run code). Fields: configs/capabilities/template.py."""


def get_config():
  return dict(
      name="code",
      description="Python function bodies from their signature and docstring",
      license="Python standard library source: PSF License Agreement",
      data=dict(source="stdlib_functions"),
      metric=dict(name="nll"),
      general=dict(weight=0.25, capability="general"),
  )
