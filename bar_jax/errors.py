"""User-facing errors: one line that names the problem and the fix. The CLI prints it and exits 2, no traceback."""


class BarError(Exception):
  """Bad input (config, artifact, data, prompt). Message: what is wrong, then what to do about it."""
