"""The path figures: path lengths (E5 / Fig. 6a), gradient per path length (E6 / Fig. 6b),
total gradient per length and the effective paths (E7 / Fig. 6c), and deletion removing long
paths (E9 / Fig. 7).

E5 and E9 are counting, drawn for the network's own n; E6 and E7 read gradients.json. The numbers
the report's table quotes (the E5 interval, the E6 decay fit, the E7 interval) are computed by
the functions here that the figures use, so a figure and its row never disagree.
"""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from resnet_ensemble import path_counts
from resnet_ensemble.report import paper
from resnet_ensemble.report.page import Page, pct


# ---------------------------------------------------------------------------------------------
# E5 and E9: counting paths.

def central_interval(n: int, mass: float = 0.95) -> tuple[int, int]:
  """E5's interval: the paper's own at its n, else the narrowest central one with >= mass."""
  if n == paper.N:
    return paper.E5_INTERVAL
  return narrowest_central(n, mass)


def narrowest_central(n: int, mass: float) -> tuple[int, int]:
  """The narrowest interval of lengths around n / 2 holding at least ``mass`` of the paths."""
  lo0, hi0 = n // 2, (n + 1) // 2
  for h in range(n + 1):
    lo, hi = max(0, lo0 - h), min(n, hi0 + h)
    if path_counts.share_of_paths(n, lo, hi) >= mass:
      return lo, hi
  return 0, n


def deleted_counts(n: int) -> list[int]:
  """Fig. 7's d = 1, 10, 20; scaled down for networks too small to lose 20 blocks."""
  if n >= max(paper.E9_DELETED):
    return list(paper.E9_DELETED)
  return sorted({min(n, max(1, round(d * n / paper.N))) for d in paper.E9_DELETED})


def fig_path_lengths(page: Page, n: int, n_from: str,
                     unit: str = "blocks") -> tuple[int, int, float]:
  """Fig. 6a: C(n, k) with the central >= 95 % interval shaded."""
  counts = np.array([float(c) for c in path_counts.path_counts(n)])
  lo, hi = central_interval(n)
  share = float(path_counts.share_of_paths(n, lo, hi))
  fig, ax = plt.subplots(figsize=(6.5, 4))
  k = np.arange(n + 1)
  ax.bar(k, counts, width=0.8, color="C0")
  ax.axvspan(lo - 0.5, hi + 0.5, color="C1", alpha=0.2,
             label=f"lengths {lo}–{hi}: {pct(share)} of paths")
  ax.set_title(f"Distribution of path length (n = {n} {unit})")
  ax.set_xlabel("path length")
  ax.set_ylabel("number of paths")
  ax.legend(fontsize=8, loc="upper right")
  nlo, nhi = narrowest_central(n, 0.95)
  text = [f"Of the 2^{n} paths ({n_from}), lengths {lo}–{hi} hold {pct(share)}; the "
          f"narrowest central interval with ≥ 95 % is {nlo}–{nhi} "
          f"({pct(float(path_counts.share_of_paths(n, nlo, nhi)))}). The mean length is {n / 2:g}."]
  page.section("E5 / Fig. 6a — path lengths", page.save(fig, "fig6a_path_lengths.png"), text)
  return lo, hi, share


# ---------------------------------------------------------------------------------------------
# E6 and E7: the gradient per path length (gradients.json).

def log10_curve(g: dict, key: str) -> np.ndarray | None:
  """A per-length quantity of gradients.json as log10 (-inf for a 0): its ``log10_<key>`` field,
  or, in files written before E6 kept its range, log10 of the plain values."""
  if g.get("log10_" + key) is not None:
    return np.array([-np.inf if v is None else v for v in g["log10_" + key]], np.float64)
  if g.get(key) is None:
    return None
  with np.errstate(divide="ignore"):
    return np.log10(np.asarray(g[key], dtype=np.float64))


def _lengths(k: np.ndarray) -> str:
  """1, 2, 3, 7 -> '1–3, 7'."""
  runs, out = [], [int(x) for x in k]
  for x in out:
    if runs and x == runs[-1][1] + 1:
      runs[-1][1] = x
    else:
      runs.append([x, x])
  return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in runs)


def decay_fit(k: Sequence[float], log10_mean: Sequence[float],
              level: float = 0.95) -> dict[str, float] | None:
  """E6's exponential decay: a least-squares line through log10 mean norm against path length
  over every length with a nonzero mean; the factor per extra block is 10**slope, with the
  slope's two-sided ``level`` t interval (n - 2 degrees of freedom) from the residuals, which
  hold both the sampling noise of the per-length means and any departure from one exponential.
  None below three lengths."""
  from scipy import stats  # here, not at the top: seconds to import, and only a fit needs it
  k, y = np.asarray(k, np.float64), np.asarray(log10_mean, np.float64)
  ok = np.isfinite(y)
  k, y = k[ok], y[ok]
  if k.size < 3:
    return None
  fit = stats.linregress(k, y)
  t = stats.t.ppf(0.5 + level / 2, k.size - 2)
  return {"factor": 10 ** fit.slope, "lo": 10 ** (fit.slope - t * fit.stderr),
          "hi": 10 ** (fit.slope + t * fit.stderr), "lengths": int(k.size),
          "first": int(k[0]), "last": int(k[-1]), "level": level}


def fit_text(fit: dict) -> str:
  return (f"×{fit['factor']:.3f} per extra block ({fit['level'] * 100:.0f} % CI "
          f"{fit['lo']:.3f}–{fit['hi']:.3f})")


def fig_gradient(page: Page, pj: dict | None) -> dict | None:
  """Fig. 6b: mean gradient norm per path length over every length 0..n, log scale; returns
  the decay fit."""
  g = (pj or {}).get("gradient")
  if not g:
    return None
  k = np.asarray(g["k"], dtype=np.float64)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  curves = [("mean_norm", "std_norm", "at the first block's input (y₀)", "C0"),
            ("mean_norm_image", "std_norm_image", "at the image", "C2")]
  logs = [(log10_curve(g, m), log10_curve(g, s), label, color)
          for m, s, label, color in curves]
  lowest = min(float(np.min(m[np.isfinite(m)], initial=0.0)) for m, *_ in logs if m is not None)
  in_range = lowest > -300  # float64 holds the values: a log axis of the values themselves
  for m, s, label, color in logs:
    if m is None:
      continue
    pos = np.isfinite(m)
    if in_range:
      mean = 10.0 ** m
      std = 10.0 ** s if s is not None else np.zeros_like(mean)
      ax.plot(k[pos], mean[pos], "o-", ms=3, lw=1, color=color, label=label)
      lower = np.where(mean - std > 0, mean - std, mean * 1e-3)  # a log axis cannot show <= 0
      ax.fill_between(k[pos], lower[pos], (mean + std)[pos], color=color, alpha=0.2, lw=0)
    else:
      ax.plot(k[pos], m[pos], "o-", ms=3, lw=1, color=color, label=label)
  if in_range:
    ax.set_yscale("log")
  ax.set_title("Gradient magnitude at input given a path length k")
  ax.set_xlabel("path length")
  ax.set_ylabel("gradient magnitude at input" + ("" if in_range else " (log10)"))
  ax.legend(fontsize=8)
  m = logs[0][0]
  fit = decay_fit(k, m)
  text = []
  zero = k[~np.isfinite(m)]
  if zero.size and g.get("log10_mean_norm") is None:
    text.append(f"Lengths {_lengths(zero)} have a mean norm of exactly 0 in this gradients.json, "
                f"written before E6 kept its range: its float32 backward pass underflowed "
                f"there (left out of the fit); rerun `--mode=gradients` to measure them.")
  elif zero.size:
    text.append(f"Lengths {_lengths(zero)} have a mean norm of exactly 0 (left out of the "
                f"fit).")
  if fit is not None:
    ok = np.isfinite(m)
    first, last = int(np.flatnonzero(ok)[0]), int(np.flatnonzero(ok)[-1])
    text.insert(0, f"The mean gradient norm ({g.get('samples_per_k', 'n/a')} sampled paths per "
                   f"length, batch {g.get('batch_size', 'n/a')}) "
                   f"{'falls' if m[last] < m[first] else 'rises'} from "
                   f"{_sci(m[first])} at length {int(k[first])} to {_sci(m[last])} at length "
                   f"{int(k[last])}: a log-linear fit over {fit['lengths']} lengths "
                   f"({_lengths(k[ok])}) gives {fit_text(fit)}.")
  page.section("E6 / Fig. 6b — gradient magnitude per path length",
               page.save(fig, "fig6b_gradient_per_length.png"), text)
  return fit


def _sci(log10: float) -> str:
  """10**log10 as 3 significant digits, at any magnitude ('4.81e-32')."""
  exponent = math.floor(log10)
  mantissa = 10 ** (log10 - exponent)
  if round(mantissa, 2) >= 10:
    mantissa, exponent = mantissa / 10, exponent + 1
  return f"{mantissa:.2f}e{exponent:+03d}"


def effective(n: int, pj: dict | None) -> tuple[np.ndarray, int, int, float] | None:
  """E7's total gradient per length (relative to its peak: at any magnitude), its shortest
  interval holding ``path_counts.E7_MASS`` of it and that interval's share of paths."""
  g = (pj or {}).get("gradient")
  if not g:
    return None
  log10_mean = log10_curve(g, "mean_norm")
  if log10_mean is None:
    return None
  if log10_mean.size != n + 1:
    raise ValueError(f"gradients.json: gradient.mean_norm has {log10_mean.size} entries, "
                     f"expected n+1 = {n + 1}")
  total = path_counts.relative_weights(path_counts.log10_total_gradient(n, log10_mean))
  lo, hi = path_counts.effective_interval(total, mass=path_counts.E7_MASS)
  return total, lo, hi, float(path_counts.share_of_paths(n, lo, hi))


def fig_total_gradient(page: Page, n: int, eff: tuple | None,
                       layers: str = "for basic blocks") -> None:
  """Fig. 6c: C(n, k) x mean norm(k), the shortest E7_MASS interval shaded. ``layers``: how a
  length counts layers (basic blocks: two each; "" says nothing)."""
  if eff is None:
    return
  total, lo, hi, share = eff
  k = np.arange(n + 1)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  ax.plot(k, total, "o-", ms=3, lw=1, color="C0")
  ax.axvspan(lo - 0.5, hi + 0.5, color="C1", alpha=0.2,
             label=f"{path_counts.E7_MASS * 100:.0f} % of total gradient: lengths {lo}–{hi}\n"
                   f"= {pct(share)} of all paths")
  ax.set_title("Total gradient magnitude per path length")
  ax.set_xlabel("path length")
  ax.set_ylabel("total gradient magnitude (relative to its peak)")
  ax.legend(fontsize=8, loc="upper right")
  peak = int(np.argmax(total))
  note = f" ({2 * lo}–{2 * hi} layers {layers})" if layers else ""
  text = [f"{path_counts.E7_MASS * 100:.0f} % of the total gradient comes from paths of length "
          f"{lo}–{hi}{note}, which are {pct(share)} of all "
          f"paths; the total peaks at length {peak} (which alone holds "
          f"{pct(total[peak] / total.sum(), 1)} of it), against a typical path length of "
          f"{n / 2:g}."]
  page.section("E7 / Fig. 6c — total gradient per path length",
               page.save(fig, "fig6c_total_gradient.png"), text)


# ---------------------------------------------------------------------------------------------
# E9.

def fig_deletion_paths(page: Page, n: int, eff: tuple | None, unit: str = "blocks") -> None:
  """Fig. 7 (analytic): deleting blocks removes long paths far more than short ones."""
  ds = deleted_counts(n)
  x = np.arange(n + 1)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for d in ds:
    ax.plot(x, [path_counts.surviving_fraction(n, d, int(v)) for v in x], lw=1.5,
            label=f"{d} deleted")
  if eff is not None:
    ax.axvspan(eff[1] - 0.5, eff[2] + 0.5, color="C1", alpha=0.15, label="effective lengths")
  ax.set_title(f"Deletion removes long paths (n = {n} {unit})")
  ax.set_xlabel("path length")
  ax.set_ylabel("fraction of remaining paths")
  ax.legend(fontsize=8)
  d = ds[len(ds) // 2]
  typical = n // 2
  short = eff[1] if eff is not None and eff[1] < typical else max(1, n // 10)
  kept = pct(path_counts.surviving_fraction(n, d, short))
  text = [f"Deleting {d} of {n} {unit} leaves {kept} of "
          f"the length-{short} paths but only "
          f"{pct(path_counts.surviving_fraction(n, d, typical))} of the typical length-{typical} "
          f"ones (curves for d = {', '.join(map(str, ds))})."]
  page.section("E9 / Fig. 7 — deletion removes long paths",
               page.save(fig, "fig7_deletion_removes_long_paths.png"), text)
