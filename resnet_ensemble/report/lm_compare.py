"""The transformer's numbers beside a ResNet's (``--config.report.resnet``, e.g. our ResNet-110)
and beside what the papers report, in one table of the transformer's report.

Damage is compared as the share of top-1 accuracy a variant keeps, (1 - error) / (1 - intact
error): the measure of Lad et al., and one that reads the same for a 10-class image classifier
and a 256-way next-byte predictor. Random deletions are compared at the same share of the
network, a quarter of its blocks (ResNet) or branches (transformer), the share ShortGPT removes.
"""

from __future__ import annotations

import numpy as np

from resnet_ensemble import workdir as workdir_lib
from resnet_ensemble.report import path_figures, read
from resnet_ensemble.report import paper as resnet_paper
from resnet_ensemble.report.page import pct

# The papers' findings, as they state them (see README, "Residual transformers").
LAD = ("Lad et al. 2024 (8 LLMs): deleting one layer or swapping two adjacent ones keeps "
       "72–95 % of top-1 accuracy; the first and last layers are the fragile ones")
LAD_SWAP = "Lad et al. 2024: as for deleting one layer (72–95 % kept)"
SHORTGPT = "ShortGPT (Men et al. 2024): 9 of Llama-2-7B's 32 layers (28 %) removed"
GROMOV = ("Gromov et al. 2024: Llama-2-70B's question answering holds until about half of "
          "its layers are deleted")
VEIT_SINGLE = ("Veit et al.: ResNet-110 on CIFAR-10 barely changes when any one block but a "
               "downsampling one is deleted")
VEIT_PATHS = (f"Veit et al.: lengths {resnet_paper.EFFECTIVE_LENGTHS} of {resnet_paper.N} "
              f"({resnet_paper.EFFECTIVE_SHARE} of paths)")
SHARE = 0.25  # random deletions compared at a quarter of the blocks or branches


def kept(error, intact_error: float) -> np.ndarray:
  """The share of the intact model's top-1 accuracy a variant keeps."""
  return (1.0 - np.asarray(error, np.float64)) / (1.0 - float(intact_error))


def _kept_text(values) -> str:
  v = np.asarray(values, np.float64)
  return f"{pct(np.median(v), 1)} (min {pct(v.min(), 1)})"


def _random_at_share(section: dict | None, n: int,
                     intact_error: float) -> tuple[int, float] | None:
  """(k, mean accuracy kept over the draws) of E3's deletions nearest a ``SHARE`` of ``n``."""
  if not section:
    return None
  ks = list(section["k"])
  k = min(ks, key=lambda x: abs(x - SHARE * n))
  if k == 0:
    return None
  return k, float(np.mean(kept(section["error"][ks.index(k)], intact_error)))


def _paths(n: int, gradients: dict | None) -> tuple[str, str]:
  """E7's interval and share, and E6's decay per extra block, as table cells."""
  eff = path_figures.effective(n, gradients)
  g = (gradients or {}).get("gradient") or {}
  log10 = path_figures.log10_curve(g, "mean_norm") if g else None
  fit = path_figures.decay_fit(np.arange(len(log10)), log10) if log10 is not None else None
  e7 = "—" if eff is None else f"{eff[1]}–{eff[2]} of {n} ({pct(eff[3])} of paths)"
  e6 = "—" if fit is None else f"×{fit['factor']:.3f}"
  return e7, e6


def _resnet_cells(lesion: dict | None, gradients: dict | None) -> dict[str, str]:
  if not lesion:
    return {}
  n = lesion["layout"]["n_blocks"]
  intact = lesion["baseline"]["error"]
  cells = {"single": _kept_text(kept(lesion["single"]["error"], intact)) + f" over {n} blocks"}
  reorder = lesion.get("reorder")
  if reorder and 1 in reorder["k"]:
    one = kept(reorder["error"][reorder["k"].index(1)], intact)
    cells["swap"] = f"{pct(one.mean(), 1)} (one random swap, {len(one)} draws)"
  at = _random_at_share(lesion.get("random"), n, intact)
  if at:
    cells["quarter"] = f"{pct(at[1], 1)} (k = {at[0]} of {n})"
  cells["e7"], cells["e6"] = _paths(n, gradients)
  return cells


def _lm_cells(lesion: dict, gradients: dict | None) -> dict[str, str]:
  n, intact = lesion["layout"]["n_branches"], lesion["baseline"]["error"]
  layers = kept(lesion["single_layer"]["error"], intact)
  cells = {"single": _kept_text(kept(lesion["single"]["error"], intact)) + f" over {n} branches",
           "layer": (f"{pct(np.mean(layers[1:-1]), 1)} middle layers; first {pct(layers[0], 1)}, "
                     f"last {pct(layers[-1], 1)}") if len(layers) > 2 else "—"}
  swaps = lesion.get("adjacent_swaps")
  if swaps:
    cells["swap"] = _kept_text(kept(swaps["error"], intact)) + " (adjacent layers)"
  quarter = []
  for key, what in (("random", "any branch"), ("random_keep_ends", "first and last layer kept")):
    at = _random_at_share(lesion.get(key), n, intact)
    if at:
      quarter.append(f"{pct(at[1], 1)} ({what}, k = {at[0]} of {n})")
  cells["quarter"] = "; ".join(quarter) or "—"
  cells["e7"], cells["e6"] = _paths(n, gradients)
  return cells


ROWS = (("single", "delete one block / branch: accuracy kept, median", VEIT_SINGLE),
        ("layer", "delete one layer (attention + MLP): accuracy kept", LAD),
        ("swap", "swap two blocks / layers: accuracy kept", LAD_SWAP),
        ("quarter", "delete a quarter at random: accuracy kept, mean over draws",
         f"{SHORTGPT}; {GROMOV}"),
        ("e7", "E7: lengths with 90 % of the total gradient", VEIT_PATHS),
        ("e6", "E6: gradient magnitude per extra block / branch (log-linear fit)",
         f"Veit et al.: {resnet_paper.DECAY}"))


def section(lesion: dict | None, gradients: dict | None, resnet_workdir: str | None) -> list[str]:
  """The report's "Beside a ResNet and the papers" section (empty without lesion.json)."""
  if not lesion:
    return []
  resnet_lesion = read.load(resnet_workdir, "lesion.json") if resnet_workdir else None
  resnet_gradients = (read.load(resnet_workdir, workdir_lib.gradients_file(resnet_workdir))
                      if resnet_lesion else None)
  ours = _lm_cells(lesion, gradients)
  theirs = _resnet_cells(resnet_lesion, resnet_gradients)
  resnet_name = read.model_label(resnet_lesion) if resnet_lesion else "ResNet"
  lines = ["## Beside a ResNet and the papers", "",
           "Damage as the share of the intact model's top-1 accuracy a variant keeps, "
           "(1 − error) / (1 − intact error)" + (
               f"; {resnet_name} from `{resnet_workdir}` (CIFAR-10 test error "
               f"{pct(resnet_lesion['baseline']['error'])})." if resnet_lesion else
               "; no ResNet given (`--config.report.resnet`)."), "",
           f"| measure | this transformer | {resnet_name} | papers |", "|---|---|---|---|"]
  for key, label, papers in ROWS:
    lines.append(f"| {label} | {ours.get(key, '—')} | {theirs.get(key, '—')} | {papers} |")
  return lines + [""]
