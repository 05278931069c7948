"""Tolerances in units of the result: every test says how many float32 ulps of the largest value it allows, and why.

One ulp of x is eps * |x| (float32 eps = 2**-23 = 1.2e-7). A sum of n float32 terms taken in another order moves by
up to ~n ulps of its magnitude (typically ~sqrt(n)), so two programs that compute the same function but block their
sums differently (another shape, another dispatch path, another CPU) agree to some tens of ulps, never bit for bit.
"""
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def ulps(reference, n: float) -> float:
  """n float32 ulps of the largest |value| in reference: an absolute tolerance for assert_allclose(atol=...)."""
  return n * EPS32 * float(np.max(np.abs(np.asarray(reference))))
