"""Figures and report.md from the experiments' JSON results (paper Fig. 3-8, E1-E10).

Every input is optional: a figure is drawn for whatever results exist, and report.md says which
experiments are missing and the command that produces each one, so a half-finished run still
gives a readable report. Numbers in the text are computed from the results, never canned.
Errors are plotted as fractions (as the paper's axes are) and written as percentages.
"""

from __future__ import annotations

import io
import json
import math
import re
import shlex
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display is ever needed to write PNGs
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from resnet_ensemble import path_counts, workdir as workdir_lib, writers  # noqa: E402

DPI = 120

# Paper values (PAPER.md) for the "ours vs paper" table.
PAPER_RESNET_ERROR = "6.10 %"
PAPER_EFFECTIVE_ERROR = "5.96 %"
PAPER_DELETE_10 = "≈ 0.2 (≈ 20 %)"
PAPER_PATH_SHARE = "> 95 % (98.0 %)"
PAPER_DECAY = "about exponential decay (1,000 paths per length)"
PAPER_EFFECTIVE_LENGTHS = "5–17 (10–34 layers)"
PAPER_EFFECTIVE_SHARE = "0.45 % (0.4537 %)"
PAPER_VGG = "chance level (≈ 90 %)"
PAPER_N = 54
PAPER_E5_INTERVAL = (19, 35)  # the paper's interval for n = 54 (98.0 %)
E7_MASS = 0.9                 # "ours": the shortest interval holding 90 % of total gradient
E9_DELETED = (1, 10, 20)      # Fig. 7 curves for n = 54

# Config files named in the "missing" commands when write_report is not told the run's own
# (config_file), and for the comparison runs; adjust here if the configs are renamed.
CONFIGS = {
  "resnet": "configs/cifar10_resnet110.py",
  "imagenet": "configs/imagenet_resnet200.py",
  "vgg": "configs/cifar10_vgg15.py",
  "sd": "configs/cifar10_resnet110_sd.py",
  "effective": "configs/cifar10_resnet110_effective.py",
}
DEFAULT_WORKDIRS = {"vgg": "runs/vgg15", "sd": "runs/resnet110_sd",
                    "effective": "runs/resnet110_effective"}
NUM_CLASSES = {"cifar10": 10, "digits": 10, "imagenet2012": 1000}


# ---------------------------------------------------------------------------------------------
# Small helpers.

def _pct(x: float, digits: int = 2) -> str:
  """One percentage format for the whole report ("6.10 %"), so rows compare at a glance."""
  if x is None or not math.isfinite(float(x)):
    return "n/a"
  return f"{100 * float(x):.{digits}f} %"


def _pp(x: float) -> str:
  """A difference of two error rates, in percentage points."""
  return f"{100 * float(x):.2f} percentage points"


def _load(directory: str | None, name: str) -> dict | None:
  """The parsed JSON file, None if absent; a corrupt file is an error, not a silent gap."""
  if directory is None:
    return None
  path = workdir_lib.path(directory, name)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def _config(result: dict | None) -> dict:
  """The run config stored in a result file ({} if none), as a plain dict."""
  return dict((result or {}).get("config") or {})


def _data_name(result: dict | None) -> str:
  return str(_config(result).get("data", {}).get("name", "cifar10"))


def _chance_error(result: dict | None) -> float:
  """Error of a uniform guess: what 'chance level' means for this data set."""
  return 1.0 - 1.0 / NUM_CLASSES.get(_data_name(result), 10)


def _layout(lesion: dict) -> tuple[int, list[int]]:
  """Number of blocks and the 0-based downsampling blocks of a lesion result."""
  layout = lesion.get("layout") or {}
  n = layout.get("n_blocks")
  if n is None:
    n = len((lesion.get("single") or {}).get("error", []))
  return int(n), [int(i) for i in layout.get("downsampling", [])]


def _is_plain(lesion: dict) -> bool:
  return lesion.get("model_kind") == "plain" or _config(lesion).get("model", {}).get(
    "name") == "plain"


def _model_label(lesion: dict | None, fallback: str = "ResNet") -> str:
  """ResNet-110 / VGG-15 style name: depth from the config, else from the block count."""
  if lesion is None:
    return fallback
  n, _ = _layout(lesion)
  if _is_plain(lesion):
    return f"VGG-{n + 2}"  # stem + n deletable layers + dense
  if _config(lesion).get("weights"):
    return f"{_config(lesion).get('arch', 'ResNet')} (pretrained)"
  depth = _config(lesion).get("model", {}).get("depth")
  return f"ResNet-{depth}" if depth else f"ResNet ({n} blocks)"


def _blocks_1based(indices: Sequence[int]) -> str:
  return ", ".join(str(i + 1) for i in indices)


def _stats(entry: dict) -> dict[str, np.ndarray]:
  """k, mean, std, min, max of a random-deletion result; recomputed from draws if absent."""
  k = np.asarray(entry["k"], dtype=np.float64)
  draws = entry.get("error")
  out = {"k": k}
  for key, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
    if entry.get(key) is not None:
      out[key] = np.asarray(entry[key], dtype=np.float64)
    elif draws is not None:
      out[key] = np.array([fn(np.asarray(d, dtype=np.float64)) for d in draws])
    else:
      raise ValueError(f"random-deletion result has neither '{key}' nor 'error' draws")
  return out


def _k_row(k: np.ndarray, target: int) -> int:
  """Index of k == target, else of the largest k below it (small test networks)."""
  exact = np.nonzero(k == target)[0]
  if exact.size:
    return int(exact[0])
  below = np.nonzero(k <= target)[0]
  return int(below[-1]) if below.size else 0


def _central_interval(n: int, mass: float = 0.95) -> tuple[int, int]:
  """E5's interval: the paper's 19..35 at n = 54, else the narrowest central one with >= mass.

  (At n = 54 the narrowest central interval with >= 95 % is 20..34; the paper quotes 19..35.)
  """
  if n == PAPER_N:
    return PAPER_E5_INTERVAL
  return _narrowest_central(n, mass)


def _narrowest_central(n: int, mass: float) -> tuple[int, int]:
  lo0, hi0 = n // 2, (n + 1) // 2
  for h in range(n + 1):
    lo, hi = max(0, lo0 - h), min(n, hi0 + h)
    if path_counts.share_of_paths(n, lo, hi) >= mass:
      return lo, hi
  return 0, n


def _deleted_counts(n: int) -> list[int]:
  """Fig. 7's d = 1, 10, 20; scaled down for networks too small to lose 20 blocks."""
  if n >= max(E9_DELETED):
    return list(E9_DELETED)
  return sorted({min(n, max(1, round(d * n / PAPER_N))) for d in E9_DELETED})


class _Writer:
  """Collects written files, report sections and missing-experiment notes in one place."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.files: list[str] = []
    self.sections: list[tuple[str, str | None, list[str]]] = []
    self.missing: list[tuple[str, list[str]]] = []

  def save(self, fig: plt.Figure, name: str) -> str:
    path = workdir_lib.path(self.workdir, name)
    buffer = io.BytesIO()  # via bytes: savefig cannot write to gs:// itself
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    path.write_bytes(buffer.getvalue())
    self.files.append(str(path))
    return name

  def section(self, title: str, image: str | None, text: list[str]) -> None:
    self.sections.append((title, image, text))

  def miss(self, what: str, *commands: str) -> None:
    self.missing.append((what, list(commands)))


def _cmd(config: str, workdir: str, mode: str | None = None, flags: Sequence[str] = ()) -> str:
  """A command line to paste: each word shell-quoted, so a path with a space stays one word."""
  argv = ["python", "-m", "resnet_ensemble", f"--config={config}", f"--workdir={workdir}"]
  return shlex.join(argv + ([f"--mode={mode}"] if mode else []) + list(flags))


# ---------------------------------------------------------------------------------------------
# E1 / E2 / E10: single-block deletion.

def _plot_single(ax: plt.Axes, lesion: dict, label: str, color: str,
                 mark_down: bool = True) -> None:
  """Error vs 1-based deleted-block index, the undamaged baseline dashed, downsampling marked."""
  err = np.asarray(lesion["single"]["error"], dtype=np.float64)
  n, down = _layout(lesion)
  x = np.arange(1, err.size + 1)
  ax.plot(x, err, "o-", color=color, ms=3, lw=1, label=label)
  base = (lesion.get("baseline") or {}).get("error")
  if base is not None:
    ax.axhline(base, color=color, ls="--", lw=1, label=f"{label} baseline ({_pct(base)})")
  if mark_down and down:
    d = [i for i in down if i < err.size]
    ax.scatter(np.asarray(d) + 1, err[d], s=70, facecolors="none", edgecolors="red", zorder=5,
               label="downsampling block" if color != "red" else None)


def _single_text(lesion: dict, label: str) -> str:
  """What single-block deletion did, in numbers: downsampling blocks vs all others."""
  err = np.asarray(lesion["single"]["error"], dtype=np.float64)
  _, down = _layout(lesion)
  base = float((lesion.get("baseline") or {}).get("error", np.nan))
  chance = _chance_error(lesion)
  if _is_plain(lesion):
    return (f"{label}: deleting any single layer gives a test error between {_pct(err.min())} "
            f"and {_pct(err.max())} (baseline {_pct(base)}; chance is {_pct(chance)}).")
  others = np.array([i for i in range(err.size) if i not in down], dtype=int)
  parts = []
  if down:
    errs = ", ".join(f"{_pct(err[i])} (block {i + 1})" for i in down if i < err.size)
    parts.append(f"{label}: deleting a downsampling block raises the error to {errs}, "
                 f"from a baseline of {_pct(base)}.")
  else:
    parts.append(f"{label}: baseline error {_pct(base)}.")
  if others.size:
    delta = err[others] - base
    j = int(others[np.argmax(np.abs(delta))])
    parts.append(f"Deleting any other block changes it by at most {_pp(abs(err[j] - base))} "
                 f"(block {j + 1}: {_pct(err[j])}); the median change is "
                 f"{_pp(float(np.median(delta)))}.")
  return " ".join(parts)


def _fig_single(w: _Writer, lesion: dict | None, vgg: dict | None) -> None:
  """Fig. 3 (CIFAR, with the VGG panel) or Fig. 4 (ImageNet)."""
  have = [(x, c) for x, c in ((lesion, "C0"), (vgg, "C1"))
          if x is not None and (x.get("single") or {}).get("error")]
  if not have:
    return
  imagenet = _data_name(lesion) == "imagenet2012"
  name = ("fig4_imagenet_single_block_deletion.png" if imagenet
          else "fig3_single_block_deletion.png")
  fig, axes = plt.subplots(1, len(have), figsize=(6 * len(have), 4), squeeze=False)
  text = []
  for ax, (res, color) in zip(axes[0], have):
    label = _model_label(res)
    _plot_single(ax, res, label, color)
    if _is_plain(res):
      ax.axhline(_chance_error(res), color="gray", ls=":", lw=1, label="chance")
    ax.set_title(f"{label}: test error when dropping any single "
                 f"{'layer' if _is_plain(res) else 'block'}")
    ax.set_xlabel("dropped layer index")
    ax.set_ylabel("Test classification error" if not imagenet else "Top-1 error")
    ax.set_ylim(0, 1.0 if res is vgg or imagenet else None)
    ax.legend(fontsize=8)
    text.append(_single_text(res, label))
  fig.suptitle("Results when dropping individual blocks" if not imagenet
               else "Dropping individual blocks from ResNet on ImageNet")
  title = "E2 / Fig. 4 — single-block deletion (ImageNet)" if imagenet else (
    "E1 / Fig. 3 — single-block deletion")
  w.section(title, w.save(fig, name), text)


def _fig_stochastic_depth(w: _Writer, lesion: dict | None, sd: dict | None) -> None:
  """Fig. 8: single-block deletion for the stochastic-depth model beside the normal one."""
  if sd is None or not (sd.get("single") or {}).get("error"):
    return
  fig, ax = plt.subplots(figsize=(7, 4))
  text = []
  if lesion is not None and (lesion.get("single") or {}).get("error"):
    _plot_single(ax, lesion, "without stochastic depth", "C0")
  _plot_single(ax, sd, "with stochastic depth", "C2", mark_down=lesion is None)
  ax.set_title("Dropping individual blocks: trained with vs without stochastic depth")
  ax.set_xlabel("dropped layer index")
  ax.set_ylabel("Test classification error")
  ax.set_ylim(bottom=0)
  ax.legend(fontsize=8)
  text.append(_single_text(sd, "With stochastic depth"))
  if lesion is not None and (lesion.get("single") or {}).get("error"):
    a = np.asarray(lesion["single"]["error"], dtype=np.float64)
    b = np.asarray(sd["single"]["error"], dtype=np.float64)
    if a.size == b.size:
      _, down = _layout(lesion)
      others = [i for i in range(a.size) if i not in down]
      parts = [f"Mean error over the non-downsampling deletions: {_pct(np.mean(a[others]))} "
               f"without vs {_pct(np.mean(b[others]))} with stochastic depth"]
      if down:
        parts.append("at the downsampling blocks " + ", ".join(
          f"{_pct(a[i])} vs {_pct(b[i])} (block {i + 1})" for i in down))
      text.append("; ".join(parts) + ".")
  w.section("E10 / Fig. 8 — stochastic depth", w.save(fig, "fig8_stochastic_depth.png"), text)


# ---------------------------------------------------------------------------------------------
# E3 / E4: deleting and reordering several blocks.

def _fig_delete_k(w: _Writer, lesion: dict | None) -> list[dict] | None:
  """Fig. 5a; returns each variant's label and stats for the table."""
  if lesion is None:
    return None
  variants = [(lesion.get("random"), "all blocks eligible", "C0", 0.0),
              (lesion.get("random_no_downsampling"), "downsampling blocks never deleted", "C1",
               0.2)]
  variants = [v for v in variants if v[0] and len(v[0].get("k", ())) > 1]  # k = 0 alone: not run
  if not variants:
    return None
  fig, ax = plt.subplots(figsize=(6.5, 4))
  text, table = [], []
  for entry, label, color, dx in variants:
    s = _stats(entry)
    k = s["k"] + dx
    ax.fill_between(k, s["mean"] - s["std"], s["mean"] + s["std"], color=color, alpha=0.2,
                    lw=0)
    whiskers = [np.maximum(s["mean"] - s["min"], 0), np.maximum(s["max"] - s["mean"], 0)]
    ax.errorbar(k, s["mean"], yerr=whiskers, fmt="o-",
                ms=3, lw=1, color=color, capsize=2, elinewidth=0.7,
                label=f"{label} (mean ± std, min/max)")
    i10, last = _k_row(s["k"], 10), len(s["k"]) - 1
    steps = np.diff(s["mean"])
    text.append(
      f"{label.capitalize()} ({entry.get('draws', 'n/a')} draws per k): mean error "
      f"{_pct(s['mean'][0])} at k = {int(s['k'][0])}, {_pct(s['mean'][i10])} ± "
      f"{_pct(s['std'][i10])} at k = {int(s['k'][i10])}, {_pct(s['mean'][last])} at "
      f"k = {int(s['k'][last])}; the largest rise between consecutive k is "
      f"{_pp(steps.max()) if steps.size else 'n/a'}.")
    table.append({"label": label, "stats": s, "i10": i10, "draws": entry.get("draws")})
  base = (lesion.get("baseline") or {}).get("error")
  if base is not None:
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"baseline ({_pct(base)})")
  ax.axhline(_chance_error(lesion), color="gray", ls=":", lw=1, label="chance")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_title("Error when deleting layers")
  ax.set_xlabel("Number of layers deleted")
  ax.set_ylabel("Error")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  w.section("E3 / Fig. 5a — deleting k random blocks",
            w.save(fig, "fig5a_delete_k_blocks.png"), text)
  return table


def _fig_reorder(w: _Writer, lesion: dict | None) -> None:
  """Fig. 5b: error vs Kendall tau, every draw plus the per-k means."""
  entry = (lesion or {}).get("reorder")
  if not entry:
    return
  ks = np.asarray(entry["k"])
  taus = [np.asarray(t, dtype=np.float64) for t in entry["tau"]]
  errs = [np.asarray(e, dtype=np.float64) for e in entry["error"]]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  all_t, all_e = np.concatenate(taus), np.concatenate(errs)
  all_k = np.concatenate([np.full(t.size, k) for k, t in zip(ks, taus)])
  sc = ax.scatter(all_t, all_e, c=all_k, cmap="viridis", s=8, alpha=0.35, lw=0)
  mt = np.array([t.mean() for t in taus])
  me = np.array([e.mean() for e in errs])
  ax.plot(mt, me, "o-", color="black", ms=3, lw=1, label="mean per k")
  base = (lesion.get("baseline") or {}).get("error")
  if base is not None:
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"baseline ({_pct(base)})")
  fig.colorbar(sc, ax=ax, label="pairs of blocks swapped (k)")
  ax.invert_xaxis()  # tau = 1 (original order) on the left, as in the paper
  ax.set_title("Error when permuting layers")
  ax.set_xlabel("Kendall Tau correlation")
  ax.set_ylabel("Error")
  ax.legend(fontsize=8)
  r = float(np.corrcoef(all_t, all_e)[0, 1]) if all_t.size > 1 and all_t.std() > 0 else np.nan
  text = [f"Over {all_t.size} draws ({entry.get('draws', 'n/a')} per k, k = {int(ks[0])}.."
          f"{int(ks[-1])} swaps), Kendall tau spans {all_t.min():.3f}..{all_t.max():.3f}; the "
          f"mean error grows from {_pct(me[0])} (k = {int(ks[0])}, mean tau {mt[0]:.3f}) to "
          f"{_pct(me[-1])} (k = {int(ks[-1])}, mean tau {mt[-1]:.3f}); the correlation between "
          f"tau and error is r = {r:.2f}."]
  w.section("E4 / Fig. 5b — reordering blocks", w.save(fig, "fig5b_reorder.png"), text)
  _fig_single_swaps(w, lesion)


def _fig_single_swaps(w: _Writer, lesion: dict) -> None:
  """Not in the paper: the single swaps (k = 1) by stage and by how far apart the two blocks
  are, where the mean of Fig. 5b hides which reorderings a network tolerates."""
  entry = lesion["reorder"]
  pairs = entry.get("single_swaps")
  if not pairs or entry["k"][0] != 1:
    return
  errs = np.asarray(entry["error"][0], dtype=np.float64)
  stages = lesion["layout"]["stages"]
  stage = np.asarray([next(s for s, blocks in enumerate(stages) if i in blocks) for i, _ in pairs])
  dist = np.asarray([abs(j - i) for i, j in pairs])
  fig, ax = plt.subplots(figsize=(6.5, 4))
  lines = []
  for s in np.unique(stage):
    sel = stage == s
    ax.scatter(dist[sel], errs[sel], s=18, alpha=0.8, label=f"stage {s + 1}")
    worst = int(np.flatnonzero(sel)[np.argmax(errs[sel])])
    i, j = pairs[worst]
    lines.append(f"stage {s + 1}: {int(sel.sum())} swaps, mean {_pct(errs[sel].mean())}, worst "
                 f"{_pct(errs[worst])} (blocks {i + 1} and {j + 1})")
  base = (lesion.get("baseline") or {}).get("error")
  if base is not None:
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"baseline ({_pct(base)})")
  ax.set_title("One swap: error by stage and by distance between the swapped blocks")
  ax.set_xlabel("distance between the two swapped blocks")
  ax.set_ylabel("Error")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.legend(fontsize=8)
  r = float(np.corrcoef(dist, errs)[0, 1]) if dist.std() > 0 and errs.std() > 0 else np.nan
  text = [f"The {len(pairs)} single swaps (k = 1; blocks numbered from 1): " + "; ".join(lines)
          + f". Correlation between the swap's distance and the error: r = {r:.2f}."]
  w.section("E4, one swap — which reorderings hurt (not in the paper)",
            w.save(fig, "fig5c_single_swaps.png"), text)


# ---------------------------------------------------------------------------------------------
# E5-E7, E9: paths.

def _fig_path_lengths(w: _Writer, n: int, n_from: str) -> tuple[int, int, float]:
  """Fig. 6a: C(n, k) with the central >= 95 % interval shaded."""
  counts = np.array([float(c) for c in path_counts.path_counts(n)])
  lo, hi = _central_interval(n)
  share = float(path_counts.share_of_paths(n, lo, hi))
  fig, ax = plt.subplots(figsize=(6.5, 4))
  k = np.arange(n + 1)
  ax.bar(k, counts, width=0.8, color="C0")
  ax.axvspan(lo - 0.5, hi + 0.5, color="C1", alpha=0.2,
             label=f"lengths {lo}–{hi}: {_pct(share)} of paths")
  ax.set_title(f"Distribution of path length (n = {n} blocks)")
  ax.set_xlabel("path length")
  ax.set_ylabel("number of paths")
  ax.legend(fontsize=8, loc="upper right")
  nlo, nhi = _narrowest_central(n, 0.95)
  text = [f"Of the 2^{n} paths ({n_from}), lengths {lo}–{hi} hold {_pct(share)}; the "
          f"narrowest central interval with ≥ 95 % is {nlo}–{nhi} "
          f"({_pct(float(path_counts.share_of_paths(n, nlo, nhi)))}). The mean length is {n / 2:g}."]
  w.section("E5 / Fig. 6a — path lengths", w.save(fig, "fig6a_path_lengths.png"), text)
  return lo, hi, share


def _log10_curve(g: dict, key: str) -> np.ndarray | None:
  """A per-length quantity of paths.json as log10 (-inf for a 0): its ``log10_<key>`` field,
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
  from scipy import stats
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


def _fit_text(fit: dict) -> str:
  return (f"×{fit['factor']:.3f} per extra block ({fit['level'] * 100:.0f} % CI "
          f"{fit['lo']:.3f}–{fit['hi']:.3f})")


def _fig_gradient(w: _Writer, pj: dict | None) -> dict | None:
  """Fig. 6b: mean gradient norm per path length over every length 0..n, log scale; returns
  the decay fit."""
  g = (pj or {}).get("gradient")
  if not g:
    return None
  k = np.asarray(g["k"], dtype=np.float64)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  curves = [("mean_norm", "std_norm", "at the first block's input (y₀)", "C0"),
            ("mean_norm_image", "std_norm_image", "at the image", "C2")]
  logs = [(_log10_curve(g, m), _log10_curve(g, s), label, color)
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
    text.append(f"Lengths {_lengths(zero)} have a mean norm of exactly 0 in this paths.json, "
                f"written before E6 kept its range: its float32 backward pass underflowed "
                f"there (left out of the fit); rerun `--mode=paths` to measure them.")
  elif zero.size:
    text.append(f"Lengths {_lengths(zero)} have a mean norm of exactly 0 (left out of the "
                f"fit).")
  if fit is not None:
    ok = np.isfinite(m)
    first, last = int(np.flatnonzero(ok)[0]), int(np.flatnonzero(ok)[-1])
    text.insert(0, f"The mean gradient norm ({g.get('samples_per_k', 'n/a')} sampled paths per "
                   f"length, batch {g.get('batch_size', 'n/a')}) falls from "
                   f"{_sci(m[first])} at length {int(k[first])} to {_sci(m[last])} at length "
                   f"{int(k[last])}: a log-linear fit over {fit['lengths']} lengths "
                   f"({_lengths(k[ok])}) gives {_fit_text(fit)}.")
  w.section("E6 / Fig. 6b — gradient magnitude per path length",
            w.save(fig, "fig6b_gradient_per_length.png"), text)
  return fit


def _sci(log10: float) -> str:
  """10**log10 as 3 significant digits, at any magnitude ('4.81e-32')."""
  exponent = math.floor(log10)
  mantissa = 10 ** (log10 - exponent)
  if round(mantissa, 2) >= 10:
    mantissa, exponent = mantissa / 10, exponent + 1
  return f"{mantissa:.2f}e{exponent:+03d}"


def _effective(n: int, pj: dict | None) -> tuple[np.ndarray, int, int, float] | None:
  """E7's total gradient per length (relative to its peak: at any magnitude), its 90 %
  interval and that interval's share of paths."""
  g = (pj or {}).get("gradient")
  if not g:
    return None
  log10_mean = _log10_curve(g, "mean_norm")
  if log10_mean is None:
    return None
  if log10_mean.size != n + 1:
    raise ValueError(f"paths.json: gradient.mean_norm has {log10_mean.size} entries, "
                     f"expected n+1 = {n + 1}")
  total = path_counts.relative_weights(path_counts.log10_total_gradient(n, log10_mean))
  lo, hi = path_counts.effective_interval(total, mass=E7_MASS)
  return total, lo, hi, float(path_counts.share_of_paths(n, lo, hi))


def _fig_total_gradient(w: _Writer, n: int, eff: tuple | None) -> None:
  """Fig. 6c: C(n, k) x mean norm(k), the shortest 90 % interval shaded."""
  if eff is None:
    return
  total, lo, hi, share = eff
  k = np.arange(n + 1)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  ax.plot(k, total, "o-", ms=3, lw=1, color="C0")
  ax.axvspan(lo - 0.5, hi + 0.5, color="C1", alpha=0.2,
             label=f"{E7_MASS * 100:.0f} % of total gradient: lengths {lo}–{hi}\n"
                   f"= {_pct(share)} of all paths")
  ax.set_title("Total gradient magnitude per path length")
  ax.set_xlabel("path length")
  ax.set_ylabel("total gradient magnitude (relative to its peak)")
  ax.legend(fontsize=8, loc="upper right")
  peak = int(np.argmax(total))
  text = [f"{E7_MASS * 100:.0f} % of the total gradient comes from paths of length {lo}–{hi} "
          f"({2 * lo}–{2 * hi} layers for basic blocks), which are {_pct(share)} of all "
          f"paths; the total peaks at length {peak} (which alone holds "
          f"{_pct(total[peak] / total.sum(), 1)} of it), against a typical path length of "
          f"{n / 2:g}."]
  w.section("E7 / Fig. 6c — total gradient per path length",
            w.save(fig, "fig6c_total_gradient.png"), text)


def _fig_deletion_paths(w: _Writer, n: int, eff: tuple | None) -> None:
  """Fig. 7 (analytic): deleting blocks removes long paths far more than short ones."""
  ds = _deleted_counts(n)
  x = np.arange(n + 1)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for d in ds:
    ax.plot(x, [path_counts.surviving_fraction(n, d, int(v)) for v in x], lw=1.5,
            label=f"{d} deleted")
  if eff is not None:
    ax.axvspan(eff[1] - 0.5, eff[2] + 0.5, color="C1", alpha=0.15, label="effective lengths")
  ax.set_title(f"Deletion removes long paths (n = {n} blocks)")
  ax.set_xlabel("path length")
  ax.set_ylabel("fraction of remaining paths")
  ax.legend(fontsize=8)
  d = ds[len(ds) // 2]
  typical = n // 2
  short = eff[1] if eff is not None and eff[1] < typical else max(1, n // 10)
  text = [f"Deleting {d} of {n} blocks leaves {_pct(path_counts.surviving_fraction(n, d, short))} of "
          f"the length-{short} paths but only "
          f"{_pct(path_counts.surviving_fraction(n, d, typical))} of the typical length-{typical} "
          f"ones (curves for d = {', '.join(map(str, ds))})."]
  w.section("E9 / Fig. 7 — deletion removes long paths",
            w.save(fig, "fig7_deletion_removes_long_paths.png"), text)


def _n_blocks(pj: dict | None, lesion: dict | None, workdir: str) -> tuple[int, str]:
  """The network's block count for the analytic figures, and where it came from."""
  if pj and pj.get("n"):
    return int(pj["n"]), "n from paths.json"
  if lesion is not None:
    n, _ = _layout(lesion)
    if n:
      return n, "n from lesion.json"
  cfg = _load(workdir, "config.json") or {}
  model = cfg.get("model", {})
  if model.get("name", "cifar_resnet") == "cifar_resnet" and model.get("depth"):
    return (int(model["depth"]) - 2) // 2, "n from config.json"
  return PAPER_N, "no run data: the paper's n = 54"


# ---------------------------------------------------------------------------------------------
# Training curves: every trained run the report is given.

def _history(workdir: str | None) -> list[dict]:
  """The run's metrics.jsonl (empty where it has none)."""
  path = workdir_lib.path(workdir, "metrics.jsonl") if workdir else None
  return writers.read_jsonl(str(path)) if path is not None and path.exists() else []


def _fig_training(w: _Writer, runs: Sequence[tuple[str, str | None]]) -> None:
  """Test error (and training error, dashed) against the step for each (label, workdir)."""
  curves = []
  for label, workdir in runs:
    history = _history(workdir)
    test = [(r["step"], r["eval_error"]) for r in history if "eval_error" in r]
    train = [(r["step"], 1.0 - r["train_accuracy"]) for r in history if "train_accuracy" in r]
    if test:
      curves.append((label, np.asarray(test, np.float64), np.asarray(train, np.float64)))
  if not curves:
    return
  fig, ax = plt.subplots(figsize=(6.5, 4))
  text = []
  for i, (label, test, train) in enumerate(curves):
    color = f"C{i}"
    ax.plot(test[:, 0], 100 * test[:, 1], "o-", ms=3, lw=1.2, color=color, label=label)
    if len(train):
      ax.plot(train[:, 0], 100 * train[:, 1], "--", lw=0.8, color=color, alpha=0.7)
    best = int(np.argmin(test[:, 1]))
    text.append(f"{label}: test error {_pct(test[-1, 1])} at step {int(test[-1, 0])} (lowest "
                f"{_pct(test[best, 1])}, step {int(test[best, 0])}).")
  ax.set_ylim(0, min(100.0, max(40.0, 100 * min(float(c[1][0, 1]) for c in curves) + 5)))
  ax.set_title("Training curves (solid: test error, dashed: training error)")
  ax.set_xlabel("step")
  ax.set_ylabel("error (%)")
  ax.legend(fontsize=8)
  w.section("Training curves", w.save(fig, "fig_training_curves.png"), text)


# ---------------------------------------------------------------------------------------------
# The report.

def _run_lines(workdir: str, lesion, pj, final, vgg, sd, eff_final) -> list[str]:
  """What was run, from the result files' own metadata."""
  lines = []

  def lesion_line(res: dict, what: str) -> str:
    n, down = _layout(res)
    cfg = _config(res)
    unit = "deletable layers" if _is_plain(res) else "blocks"
    return (f"- {what}: {_model_label(res)} ({res.get('model_kind', 'n/a')}, {n} {unit}, "
            f"stages {(res.get('layout') or {}).get('stage_sizes', 'n/a')}, downsampling blocks "
            f"{_blocks_1based(down) or 'none'}), data {cfg.get('data', {}).get('name', 'n/a')} "
            f"({res.get('data_source', 'n/a')}), seed {res.get('seed', cfg.get('seed', 'n/a'))}, "
            f"checkpoint step {res.get('checkpoint_step', 'n/a')}; undamaged test error "
            f"{_pct((res.get('baseline') or {}).get('error', float('nan')))}.")

  if final:
    lines.append(f"- Training ({workdir}): step {final.get('step', 'n/a')}, test error "
                 f"{_pct(final.get('eval_error', float('nan')))}, test loss "
                 f"{final.get('eval_loss', float('nan')):.4f}.")
  if lesion:
    lines.append(lesion_line(lesion, "Lesion study (E1, E3, E4)"))
  if pj:
    g = pj.get("gradient") or {}
    dtype = _config(pj).get("model", {}).get("dtype")
    lines.append(f"- Gradient per path length (E6, E7): n = {pj.get('n')}, checkpoint step "
                 f"{pj.get('checkpoint_step', 'n/a')}, {g.get('samples_per_k', 'n/a')} samples "
                 f"per k, batch {g.get('batch_size', 'n/a')}"
                 + (f", {dtype}" if dtype else "")
                 + (f", paths drawn as {pj['sampler']}" if pj.get("sampler") else "") + ".")
  if vgg:
    lines.append(lesion_line(vgg, "Plain network (E1 comparison)"))
  if sd:
    lines.append(lesion_line(sd, "Stochastic depth (E10)"))
  if eff_final:
    lines.append(f"- Effective-path training (E8): step {eff_final.get('step', 'n/a')}, test "
                 f"error {_pct(eff_final.get('eval_error', float('nan')))}.")
  return lines or ["- No results found."]


def _seed_of(workdir: str | None) -> str:
  return str((_load(workdir, "config.json") or {}).get("seed", "?"))


def _seed_cell(workdir: str, final: dict, others: Sequence[tuple[str, dict | None]]) -> str:
  """The main run's test error over its seeds: mean ± standard deviation (n - 1), each run."""
  runs = [(workdir, final)] + [(wd, f) for wd, f in others if f and "eval_error" in f]
  errors = np.asarray([f["eval_error"] for _, f in runs], np.float64)
  each = ", ".join(f"seed {_seed_of(wd)} {_pct(e)}" for (wd, _), e in zip(runs, errors))
  return (f"{_pct(errors.mean())} ± {_pct(errors.std(ddof=1))} over {len(runs)} seeds "
          f"({each})")


def _unfinished_banner(studies: list[tuple[str | None, dict | None]]) -> list[str]:
  """The report's first line when any analysis ran on an unfinished run
  (``--allow_unfinished``): its numbers are not the trained network's."""
  notes = sorted({f"{wd} at step {r['checkpoint_step']} of {r['num_steps']}"
                  for wd, r in studies if r and r.get("finished") is False})
  if not notes:
    return []
  return [f"> **UNFINISHED RUN: analysed before the end of training** ({'; '.join(notes)}; "
          "--allow_unfinished). These numbers are not those of the trained network.", ""]


def write_report(workdir: str, *, vgg_workdir: str | None = None, sd_workdir: str | None = None,
                 effective_workdir: str | None = None, seed_workdirs: Sequence[str] = (),
                 out_dir: str | None = None, config_file: str | None = None) -> list[str]:
  """Reads the results in workdir (and the comparison workdirs), writes PNGs and report.md
  into ``out_dir`` (default: workdir). ``seed_workdirs``: more seeds of the main run (their
  final_metrics.json), for its test error's mean and spread. ``config_file``: the config the
  run was launched with, named in the commands for its missing experiments (None: the
  per-experiment default in CONFIGS), so they rerun this run and not the paper's.

  Returns the paths of the files written (figures first, report.md last).
  """
  out_dir = out_dir or workdir
  workdir_lib.path(out_dir).mkdir(parents=True, exist_ok=True)
  lesion = _load(workdir, "lesion.json")
  pj = _load(workdir, "paths.json")
  final = _load(workdir, "final_metrics.json")
  vgg = _load(vgg_workdir, "lesion.json")
  sd = _load(sd_workdir, "lesion.json")
  eff_final = _load(effective_workdir, "final_metrics.json")
  jpeg = _load(workdir, "jpeg_gap.json")
  seeds = [(wd, _load(wd, "final_metrics.json")) for wd in seed_workdirs]
  w = _Writer(out_dir)

  n, n_from = _n_blocks(pj, lesion, workdir)
  _fig_single(w, lesion, vgg)
  delete_k = _fig_delete_k(w, lesion)
  _fig_reorder(w, lesion)
  e5 = _fig_path_lengths(w, n, n_from)
  fit = _fig_gradient(w, pj)
  eff = _effective(n, pj)
  _fig_total_gradient(w, n, eff)
  _fig_deletion_paths(w, n, eff)
  _fig_stochastic_depth(w, lesion, sd)
  name = _model_label(lesion)
  _fig_training(w, [(f"{name} (seed {_seed_of(wd)})", wd) for wd in [workdir, *seed_workdirs]]
                + [(_model_label(vgg, "plain net"), vgg_workdir),
                   (f"{name}, effective paths (E8)", effective_workdir),
                   (f"{name}, stochastic depth (E10)", sd_workdir)])

  # Ours vs paper.
  imagenet = _data_name(lesion or pj) == "imagenet2012"
  rows = []
  model = f"{_model_label(lesion)}, " if lesion else ""
  if final and final.get("eval_error") is not None:
    ours = f"{_pct(final['eval_error'])} ({model}step {final.get('step', 'n/a')})"
  elif lesion and (lesion.get("baseline") or {}).get("error") is not None:
    ours = f"{_pct(lesion['baseline']['error'])} ({model}lesion baseline)"
  else:
    ours = "missing"
  if imagenet:
    rows.append(("ImageNet top-1 validation error", ours, "— (Fig. 4: ResNet-200)"))
  else:
    rows.append(("ResNet-110 test error", ours, PAPER_RESNET_ERROR))
  if final and final.get("eval_error") is not None and any(f for _, f in seeds):
    rows.append(("test error over seeds", _seed_cell(workdir, final, seeds), "—"))
  if effective_workdir is not None:
    e = (eff_final or {}).get("eval_error")
    extra = [f"{key} {_pct(v)}" for key, v in sorted((eff_final or {}).items())
             if "error" in key and key != "eval_error" and isinstance(v, (int, float))]
    rows.append(("effective-path (23 of 54) training test error",
                 (_pct(e) + (f" ({'; '.join(extra)})" if extra else "")) if e is not None
                 else "missing", PAPER_EFFECTIVE_ERROR))
  if delete_k is not None:
    cells = []
    for v in delete_k:
      s, i = v["stats"], v["i10"]
      kk = int(s["k"][i])
      cells.append(f"{_pct(s['mean'][i])} ± {_pct(s['std'][i])} ({v['label']}"
                   + (f"; k = {kk}: largest k ≤ 10 run" if kk != 10 else "") + ")")
    rows.append(("error after deleting 10 random blocks", "; ".join(cells), PAPER_DELETE_10))
  else:
    rows.append(("error after deleting 10 random blocks", "missing", PAPER_DELETE_10))
  lo, hi, share = e5
  rows.append(("share of paths of length 19–35", f"{_pct(share)} (lengths {lo}–{hi}, n = {n})",
               PAPER_PATH_SHARE))
  if fit is not None:
    rows.append(("gradient per path length (E6)",
                 f"exponential decay, {_fit_text(fit)}; log-linear fit over lengths "
                 f"{fit['first']}–{fit['last']} ({fit['lengths']} lengths), "
                 f"{pj['gradient'].get('samples_per_k', 'n/a')} sampled paths per length",
                 PAPER_DECAY))
  else:
    rows.append(("gradient per path length (E6)", "missing", PAPER_DECAY))
  if eff is not None:
    rows.append(("effective path lengths",
                 f"{eff[1]}–{eff[2]} ({E7_MASS * 100:.0f} % of total gradient)",
                 PAPER_EFFECTIVE_LENGTHS))
    rows.append(("share of paths that are effective", _pct(eff[3]), PAPER_EFFECTIVE_SHARE))
  else:
    rows.append(("effective path lengths", "missing", PAPER_EFFECTIVE_LENGTHS))
    rows.append(("share of paths that are effective", "missing", PAPER_EFFECTIVE_SHARE))
  if jpeg is not None:
    rows.append((f"test-time JPEG gap ({jpeg['images']} test images, original vs JPEG pixels)",
                 f"{_pct(jpeg['error_exact'])} vs {_pct(jpeg['error_jpeg'])} "
                 f"({jpeg['gap_points']:+.2f} points)", "— (original pixels only)"))
  if vgg is not None and (vgg.get("single") or {}).get("error"):
    v = np.asarray(vgg["single"]["error"], dtype=np.float64)
    rows.append(("VGG, any single layer deleted",
                 f"{_pct(v.min())} – {_pct(v.max())} (min – max over {v.size} layers; chance "
                 f"{_pct(_chance_error(vgg))})", PAPER_VGG))

  # Missing experiments and the commands that produce them.
  main_cfg = config_file or CONFIGS["imagenet" if imagenet else "resnet"]
  main_flags: list[str] = []
  cfg = _config(lesion) or _config(pj)
  if cfg.get("weights"):  # imported pretrained weights: the same flags again, no training
    main_cfg = config_file or "configs/imagenet_pretrained.py"
    main_flags = [f"--config.weights={cfg['weights']}", f"--config.arch={cfg.get('arch')}"]
  if final is None and not cfg.get("weights"):
    w.miss(f"training results (final_metrics.json in {workdir})",
           _cmd(main_cfg, workdir, flags=main_flags))
  if lesion is None:
    w.miss("E1, E3, E4 (lesion.json: single-block deletion, k random deletions, reordering)",
           _cmd(main_cfg, workdir, "lesion", main_flags))
  else:
    for key, what in (("single", "E1"), ("random", "E3"),
                      ("random_no_downsampling", "E3 variant without downsampling blocks"),
                      ("reorder", "E4")):
      entry = lesion.get(key)
      if not entry or (key.startswith("random") and len(entry.get("k", ())) < 2):
        w.miss(f"{what} (lesion.json has no '{key}'" + (" with k > 0)" if entry else ")"),
               _cmd(main_cfg, workdir, "lesion", main_flags))
  if pj is None or not pj.get("gradient"):
    w.miss("E6, E7 (paths.json: gradient per path length, effective paths)",
           _cmd(main_cfg, workdir, "paths", main_flags))
  for wd, f in seeds:
    if f is None:
      seed = re.search(r"seed(\d+)/*$", wd)
      w.miss(f"another seed's training results (final_metrics.json in {wd})",
             _cmd(main_cfg, wd, flags=main_flags
                  + ([f"--config.seed={seed.group(1)}"] if seed else [])))
  if n_from.startswith("no run data"):
    w.miss("E5, E9 use the paper's n = 54 (no lesion.json or paths.json gives our n)")
  for key, wd, res, what, fname in (
      ("vgg", vgg_workdir, vgg, "VGG-15 comparison for E1 / Fig. 3", "lesion.json"),
      ("sd", sd_workdir, sd, "E10 / Fig. 8 (stochastic depth)", "lesion.json"),
      ("effective", effective_workdir, eff_final, "E8 (effective-path training)",
       "final_metrics.json")):
    if res is not None or imagenet:  # Fig. 3's VGG panel, E8 and E10 are CIFAR experiments
      continue
    d = wd or DEFAULT_WORKDIRS[key]
    cmds = [_cmd(CONFIGS[key], d)] + ([_cmd(CONFIGS[key], d, "lesion")] if key != "effective"
                                      else [])
    arg = {"vgg": "vgg_workdir", "sd": "sd_workdir", "effective": "effective_workdir"}[key]
    note = f"{fname} in {wd}" if wd else f"not given: pass {arg}="
    w.miss(f"{what} ({note})", *cmds)

  # report.md
  md = _unfinished_banner([(workdir, lesion), (workdir, pj), (vgg_workdir, vgg),
                           (sd_workdir, sd)])
  md += ["# Residual networks behave like ensembles of relatively shallow networks — "
         "reproduction report", "",
        "Veit, Wilber, Belongie (NeurIPS 2016). Errors are test-set error rates.", "",
        "## What was run", ""]
  md += _run_lines(workdir, lesion, pj, final, vgg, sd, eff_final)
  md += ["", "## Ours vs paper", "", "| quantity | ours | paper |", "| --- | --- | --- |"]
  md += [f"| {q} | {o} | {p} |" for q, o, p in rows]
  md += [""]
  for title, image, text in w.sections:
    md += [f"## {title}", ""]
    if image:
      md += [f"![{title}]({image})", ""]
    for paragraph in text:
      md += [paragraph, ""]
  md += ["## Missing experiments", ""]
  if not w.missing:
    md += ["None: every experiment has results.", ""]
  for what, cmds in w.missing:
    md.append(f"- {what}" + (":" if cmds else ""))
    md += [f"  - `{c}`" for c in cmds]
  md.append("")
  return w.files + [workdir_lib.write_text(out_dir, "report.md", "\n".join(md))]
