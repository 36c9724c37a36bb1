"""The lesion figures: deleting one block (E1 / Fig. 3, E2 / Fig. 4, E10 / Fig. 8), deleting
k random blocks (E3 / Fig. 5a) and reordering blocks (E4 / Fig. 5b, and the single swaps).

Each figure function draws from lesion.json alone, adds its section to the page with the
findings in numbers, and draws nothing where its result is absent. Block numbers in the text
are 1-based, as in the paper's figures.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from resnet_ensemble.report import paper, read
from resnet_ensemble.report.page import Page, pct, pp


# ---------------------------------------------------------------------------------------------
# E1 / E2 / E10: single-block deletion.

def _plot_single(ax: plt.Axes, lesion: dict, label: str, color: str,
                 mark_down: bool = True) -> None:
  """Error vs 1-based deleted-block index, the undamaged baseline dashed, downsampling marked."""
  err = np.asarray(lesion["single"]["error"], dtype=np.float64)
  n, down = read.layout(lesion)
  x = np.arange(1, err.size + 1)
  ax.plot(x, err, "o-", color=color, ms=3, lw=1, label=label)
  base = (lesion.get("baseline") or {}).get("error")
  if base is not None:
    ax.axhline(base, color=color, ls="--", lw=1, label=f"{label} baseline ({pct(base)})")
  if mark_down and down:
    d = [i for i in down if i < err.size]
    ax.scatter(np.asarray(d) + 1, err[d], s=70, facecolors="none", edgecolors="red", zorder=5,
               label="downsampling block" if color != "red" else None)


def single_text(lesion: dict, label: str) -> str:
  """What single-block deletion did, in numbers: downsampling blocks vs all others (the
  paper's claim is that only the downsampling blocks matter)."""
  err = np.asarray(lesion["single"]["error"], dtype=np.float64)
  _, down = read.layout(lesion)
  base = float((lesion.get("baseline") or {}).get("error", np.nan))
  chance = read.chance_error(lesion)
  if read.is_plain(lesion):
    return (f"{label}: deleting any single layer gives a test error between {pct(err.min())} "
            f"and {pct(err.max())} (baseline {pct(base)}; chance is {pct(chance)}).")
  others = np.array([i for i in range(err.size) if i not in down], dtype=int)
  parts = []
  if down:
    errs = ", ".join(f"{pct(err[i])} (block {i + 1})" for i in down if i < err.size)
    parts.append(f"{label}: deleting a downsampling block raises the error to {errs}, "
                 f"from a baseline of {pct(base)}.")
  else:
    parts.append(f"{label}: baseline error {pct(base)}.")
  if others.size:
    delta = err[others] - base
    j = int(others[np.argmax(np.abs(delta))])
    parts.append(f"Deleting any other block changes it by at most {pp(abs(err[j] - base))} "
                 f"(block {j + 1}: {pct(err[j])}); the median change is "
                 f"{pp(float(np.median(delta)))}.")
  return " ".join(parts)


def seeds_spread(lesion: dict, seed_lesions: Sequence[dict]) -> np.ndarray | None:
  """E1's errors over the main run and its seeds, one row per seed (None: no other seed has
  E1 on a network of the same shape)."""
  err = [np.asarray(x["single"]["error"], dtype=np.float64)
         for x in [lesion, *seed_lesions] if (x.get("single") or {}).get("error")]
  same = [e for e in err if e.size == err[0].size]
  return np.stack(same) if len(same) > 1 else None


def fig_single(page: Page, lesion: dict | None, vgg: dict | None,
               seed_lesions: Sequence[dict] = ()) -> None:
  """Fig. 3 (CIFAR, with the VGG panel) or Fig. 4 (ImageNet); with the seeds' E1, their mean
  and standard deviation per deleted block beside the main run's curve."""
  have = [(x, c) for x, c in ((lesion, "C0"), (vgg, "C1"))
          if x is not None and (x.get("single") or {}).get("error")]
  if not have:
    return
  imagenet = read.data_name(lesion) == "imagenet2012"
  name = ("fig4_imagenet_single_block_deletion.png" if imagenet
          else "fig3_single_block_deletion.png")
  fig, axes = plt.subplots(1, len(have), figsize=(6 * len(have), 4), squeeze=False)
  text = []
  for ax, (res, color) in zip(axes[0], have):
    label = read.model_label(res)
    _plot_single(ax, res, label, color)
    spread = seeds_spread(res, seed_lesions) if res is lesion else None
    if spread is not None:
      x = np.arange(1, spread.shape[1] + 1)
      ax.errorbar(x + 0.15, spread.mean(0), yerr=spread.std(0, ddof=1), fmt="s", ms=3,
                  color="gray", capsize=2, elinewidth=0.8,
                  label=f"mean ± std over {len(spread)} seeds")
    if read.is_plain(res):
      ax.axhline(read.chance_error(res), color="gray", ls=":", lw=1, label="chance")
    ax.set_title(f"{label}: test error when dropping any single "
                 f"{'layer' if read.is_plain(res) else 'block'}")
    ax.set_xlabel("dropped layer index")
    ax.set_ylabel("Test classification error" if not imagenet else "Top-1 error")
    ax.set_ylim(0, 1.0 if res is vgg or imagenet else None)
    ax.legend(fontsize=8)
    text.append(single_text(res, label))
    if spread is not None:
      _, down = read.layout(res)
      others = [i for i in range(spread.shape[1]) if i not in down]
      mean = spread[:, others].mean(1)
      text.append(f"Over {len(spread)} seeds, the mean error when deleting a block that is not "
                  f"a downsampling block is {pct(mean.mean())} ± {pct(mean.std(ddof=1))} "
                  f"(one value per seed: {', '.join(pct(m) for m in mean)}); the standard "
                  f"deviation over seeds per deleted block has median "
                  f"{pct(float(np.median(spread.std(0, ddof=1))))}.")
  fig.suptitle("Results when dropping individual blocks" if not imagenet
               else "Dropping individual blocks from ResNet on ImageNet")
  title = "E2 / Fig. 4 — single-block deletion (ImageNet)" if imagenet else (
    "E1 / Fig. 3 — single-block deletion")
  page.section(title, page.save(fig, name), text)


def fig_stochastic_depth(page: Page, lesion: dict | None, sd: dict | None) -> None:
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
  text.append(single_text(sd, "With stochastic depth"))
  if lesion is not None and (lesion.get("single") or {}).get("error"):
    a = np.asarray(lesion["single"]["error"], dtype=np.float64)
    b = np.asarray(sd["single"]["error"], dtype=np.float64)
    if a.size == b.size:
      _, down = read.layout(lesion)
      others = [i for i in range(a.size) if i not in down]
      parts = [f"Mean error over the non-downsampling deletions: {pct(np.mean(a[others]))} "
               f"without vs {pct(np.mean(b[others]))} with stochastic depth"]
      if down:
        parts.append("at the downsampling blocks " + ", ".join(
          f"{pct(a[i])} vs {pct(b[i])} (block {i + 1})" for i in down))
      text.append("; ".join(parts) + ".")
  page.section("E10 / Fig. 8 — stochastic depth", page.save(fig, "fig8_stochastic_depth.png"),
               text)


# ---------------------------------------------------------------------------------------------
# E3: deleting k random blocks.

def random_stats(entry: dict) -> dict[str, np.ndarray]:
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


def k_row(k: np.ndarray, target: int) -> int:
  """Index of k == target, else of the largest k below it (networks too small to lose
  ``target`` blocks)."""
  exact = np.nonzero(k == target)[0]
  if exact.size:
    return int(exact[0])
  below = np.nonzero(k <= target)[0]
  return int(below[-1]) if below.size else 0


def fig_delete_k(page: Page, lesion: dict | None) -> list[dict] | None:
  """Fig. 5a; returns each variant's label, stats and row of k = 10 for the table."""
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
    s = random_stats(entry)
    k = s["k"] + dx
    ax.fill_between(k, s["mean"] - s["std"], s["mean"] + s["std"], color=color, alpha=0.2,
                    lw=0)
    whiskers = [np.maximum(s["mean"] - s["min"], 0), np.maximum(s["max"] - s["mean"], 0)]
    ax.errorbar(k, s["mean"], yerr=whiskers, fmt="o-",
                ms=3, lw=1, color=color, capsize=2, elinewidth=0.7,
                label=f"{label} (mean ± std, min/max)")
    i10, last = k_row(s["k"], paper.delete_k(read.layout(lesion)[0])), len(s["k"]) - 1
    steps = np.diff(s["mean"])
    text.append(
      f"{label.capitalize()} ({entry.get('draws', 'n/a')} draws per k): mean error "
      f"{pct(s['mean'][0])} at k = {int(s['k'][0])}, {pct(s['mean'][i10])} ± "
      f"{pct(s['std'][i10])} at k = {int(s['k'][i10])}, {pct(s['mean'][last])} at "
      f"k = {int(s['k'][last])}; the largest rise between consecutive k is "
      f"{pp(steps.max()) if steps.size else 'n/a'}.")
    table.append({"label": label, "stats": s, "i10": i10, "draws": entry.get("draws")})
  base = (lesion.get("baseline") or {}).get("error")
  if base is not None:
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"baseline ({pct(base)})")
  ax.axhline(read.chance_error(lesion), color="gray", ls=":", lw=1, label="chance")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_title("Error when deleting layers")
  ax.set_xlabel("Number of layers deleted")
  ax.set_ylabel("Error")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  page.section("E3 / Fig. 5a — deleting k random blocks",
               page.save(fig, "fig5a_delete_k_blocks.png"), text)
  return table


# ---------------------------------------------------------------------------------------------
# E4: reordering blocks.

def fig_reorder(page: Page, lesion: dict | None) -> None:
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
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"baseline ({pct(base)})")
  fig.colorbar(sc, ax=ax, label="pairs of blocks swapped (k)")
  ax.invert_xaxis()  # tau = 1 (original order) on the left, as in the paper
  ax.set_title("Error when permuting layers")
  ax.set_xlabel("Kendall Tau correlation")
  ax.set_ylabel("Error")
  ax.legend(fontsize=8)
  r = float(np.corrcoef(all_t, all_e)[0, 1]) if all_t.size > 1 and all_t.std() > 0 else np.nan
  text = [f"Over {all_t.size} draws ({entry.get('draws', 'n/a')} per k, k = {int(ks[0])}.."
          f"{int(ks[-1])} swaps), Kendall tau spans {all_t.min():.3f}..{all_t.max():.3f}; the "
          f"mean error grows from {pct(me[0])} (k = {int(ks[0])}, mean tau {mt[0]:.3f}) to "
          f"{pct(me[-1])} (k = {int(ks[-1])}, mean tau {mt[-1]:.3f}); the correlation between "
          f"tau and error is r = {r:.2f}."]
  page.section("E4 / Fig. 5b — reordering blocks", page.save(fig, "fig5b_reorder.png"), text)
  _fig_single_swaps(page, lesion)


def _fig_single_swaps(page: Page, lesion: dict) -> None:
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
    lines.append(f"stage {s + 1}: {int(sel.sum())} swaps, mean {pct(errs[sel].mean())}, worst "
                 f"{pct(errs[worst])} (blocks {i + 1} and {j + 1})")
  base = (lesion.get("baseline") or {}).get("error")
  if base is not None:
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"baseline ({pct(base)})")
  ax.set_title("One swap: error by stage and by distance between the swapped blocks")
  ax.set_xlabel("distance between the two swapped blocks")
  ax.set_ylabel("Error")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.legend(fontsize=8)
  r = float(np.corrcoef(dist, errs)[0, 1]) if dist.std() > 0 and errs.std() > 0 else np.nan
  text = [f"The {len(pairs)} single swaps (k = 1; blocks numbered from 1): " + "; ".join(lines)
          + f". Correlation between the swap's distance and the error: r = {r:.2f}."]
  page.section("E4, one swap — which reorderings hurt (not in the paper)",
               page.save(fig, "fig5c_single_swaps.png"), text)
