"""Path counting in the unrolled view of a residual network (paper E5, E7, E9).

A network of n residual blocks unrolls into 2^n paths; a path's length k is the number of
residual modules it enters, and there are C(n, k) paths of length k. Counts reach ~1.9e15 at
n = 54, so sums and shares are done in exact integers / Fractions and only converted to float
at the end: float64 sums of such terms would silently lose the small tails the paper quotes.
"""

from __future__ import annotations

import math
from fractions import Fraction
from math import comb
from typing import Sequence

import numpy as np


def _check_n(n: int) -> None:
  """Networks need at least one block; bools and floats are rejected to keep arithmetic exact."""
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
    raise ValueError(f"n must be an integer >= 1, got {n!r}")
  if n < 1:
    raise ValueError(f"n must be >= 1 (number of residual blocks), got {n}")


def _check_length(name: str, value: int, n: int) -> None:
  """A path length is an integer in 0..n."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer in 0..{n}, got {value!r}")
  if not 0 <= value <= n:
    raise ValueError(f"{name}={value} is outside the valid path lengths 0..{n}")


def path_counts(n: int) -> list[int]:
  """Exact number of paths of each length k = 0..n: C(n, k). They sum to 2^n."""
  _check_n(n)
  return [comb(n, k) for k in range(n + 1)]


def path_length_distribution(n: int) -> np.ndarray:
  """Share of the 2^n paths having each length k = 0..n, i.e. Binomial(n, 1/2) (Fig. 6a).

  Each share is an exact Fraction rounded once to float64, so tiny tails are not lost.
  """
  counts = path_counts(n)
  total = 2**n
  return np.array([float(Fraction(c, total)) for c in counts], dtype=np.float64)


def share_of_paths(n: int, lo: int, hi: int) -> Fraction:
  """Exact share of all 2^n paths whose length lies in [lo, hi] (inclusive).

  E5: n=54, 19..35 gives 98.0 %; E7: n=54, 5..17 gives 0.4537 %.
  """
  _check_n(n)
  _check_length("lo", lo, n)
  _check_length("hi", hi, n)
  if lo > hi:
    raise ValueError(f"lo={lo} must be <= hi={hi}")
  return Fraction(sum(comb(n, k) for k in range(lo, hi + 1)), 2**n)


def surviving_fraction(n: int, d: int, x: int) -> float:
  """Fraction of length-x paths untouched when d of n blocks are deleted (E9, Fig. 7).

  A length-x path survives iff all its x residual modules avoid the d deleted blocks:
  C(n - d, x) / C(n, x), which is 0 when x > n - d. Computed as an exact Fraction.
  """
  _check_n(n)
  if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
    raise ValueError(f"d must be an integer in 0..{n}, got {d!r}")
  if not 0 <= d <= n:
    raise ValueError(f"d={d} deleted blocks is outside the valid range 0..{n}")
  _check_length("x", x, n)
  return float(Fraction(comb(n - d, x), comb(n, x)))


def total_gradient(n: int, mean_norms: Sequence[float]) -> np.ndarray:
  """Total gradient carried by each path length: C(n, k) * mean_norm(k), k = 0..n (E7, Fig. 6c).

  Counts are exact ints converted once to float64 (C(54, 27) ~ 1.9e15 < 2^53 is exact).
  """
  _check_n(n)
  norms = np.asarray(mean_norms, dtype=np.float64)
  if norms.shape != (n + 1,):
    raise ValueError(f"mean_norms must have n+1={n + 1} entries (lengths 0..{n}), "
                     f"got shape {norms.shape}")
  if not np.all(np.isfinite(norms)):
    raise ValueError("mean_norms must be finite")
  counts = np.array([float(c) for c in path_counts(n)], dtype=np.float64)
  return counts * norms


def log10_mean_std(log10_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """log10 of the mean and of the (population) standard deviation over the last axis of
  values given as log10 (-inf for a zero), without leaving the log domain: routed gradient
  norms can lie below float64's range (a path of 600 blocks). Each row is scaled by its
  largest value first, so entries more than ~300 decades below it count as 0."""
  x = np.asarray(log10_values, dtype=np.float64)
  if np.isnan(x).any() or (x == np.inf).any():
    raise ValueError("log10 values must be finite or -inf (a zero)")
  top = x.max(axis=-1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)  # a row of zeros stays zeros
  scaled = 10.0 ** (x - top)
  with np.errstate(divide="ignore"):
    return (np.log10(scaled.mean(-1)) + top[..., 0], np.log10(scaled.std(-1)) + top[..., 0])


def log10_total_gradient(n: int, log10_mean_norms: Sequence[float]) -> np.ndarray:
  """``total_gradient`` in log10: log10 C(n, k) + log10 mean_norm(k), k = 0..n, at any
  magnitude (-inf where the mean norm is 0). log10 of the exact integer C(n, k)."""
  _check_n(n)
  norms = np.asarray(log10_mean_norms, dtype=np.float64)
  if norms.shape != (n + 1,):
    raise ValueError(f"log10_mean_norms must have n+1={n + 1} entries (lengths 0..{n}), "
                     f"got shape {norms.shape}")
  if np.isnan(norms).any() or (norms == np.inf).any():
    raise ValueError("log10_mean_norms must be finite or -inf (a zero mean)")
  return np.array([math.log10(c) for c in path_counts(n)]) + norms


def relative_weights(log10_weights: Sequence[float]) -> np.ndarray:
  """Weights given as log10, divided by the largest: in (0, 1] for ``effective_interval``,
  whatever their magnitude (those > 308 decades below the largest become 0)."""
  w = np.asarray(log10_weights, dtype=np.float64)
  if w.ndim != 1 or w.size == 0 or not np.isfinite(w.max()):
    raise ValueError("log10 weights must be a non-empty 1-D sequence with a finite maximum")
  return 10.0 ** (w - w.max())


# E7: the paper says "nearly all" the gradient comes from lengths 5-17; we take the shortest
# interval of lengths holding this share of the total. One constant for the analysis, the
# report and the transformer study, so their intervals always mean the same thing.
E7_MASS = 0.9


def effective_interval(weights: Sequence[float], mass: float = E7_MASS) -> tuple[int, int]:
  """Shortest contiguous index interval [lo, hi] holding at least `mass` of the total weight.

  This is "our" reading of the paper's "nearly all gradient comes from lengths 5-17" (E7).
  Ties between equally short intervals go to the larger mass, then the lower lo. O(len^2).
  """
  w = np.asarray(weights, dtype=np.float64)
  if w.ndim != 1 or w.size == 0:
    raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {w.shape}")
  if not np.all(np.isfinite(w)):
    raise ValueError("weights must be finite")
  if np.any(w < 0):
    raise ValueError(f"weights must be >= 0, got minimum {w.min()} at index {int(w.argmin())}")
  total = float(w.sum())
  if total <= 0:
    raise ValueError("weights must not all be zero")
  if isinstance(mass, bool) or not 0 < mass <= 1:
    raise ValueError(f"mass must be in (0, 1], got {mass!r}")
  # Prefix sums; a small relative tolerance so mass=1 finds the full support despite rounding.
  prefix = np.concatenate([[0.0], np.cumsum(w)])
  target = mass * total * (1 - 1e-12)
  best: tuple[int, float, int] | None = None  # (length, -mass, lo): smaller is better
  best_hi = -1
  size = w.size
  for lo in range(size):
    for hi in range(lo, size):
      got = prefix[hi + 1] - prefix[lo]
      if got >= target:
        key = (hi - lo, -got, lo)
        if best is None or key < best:
          best, best_hi = key, hi
        break  # a longer interval from this lo cannot be shorter
  assert best is not None  # the full range always holds mass <= 1 of the total
  return best[2], best_hi
