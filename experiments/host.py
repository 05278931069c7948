"""What a benchmark says about the machine it ran on (no jax import: safe before device flags are set)."""
import os
import platform


def host_line() -> str:
  """CPU model and load average (the host may be shared: the load says how much of it this run had)."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
  return f"CPU {model}, {os.cpu_count()} cores, load average (1, 5, 15 min) {load}"
