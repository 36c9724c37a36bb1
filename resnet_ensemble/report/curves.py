"""Training curves: test error (and training error) against the step for every trained run
the report is given — the main run and its seeds, the plain network, and the E8
(effective-path) and E10 (stochastic-depth) runs — so runs trained differently compare on
one axis. Read from each run's metrics.jsonl; a run without one is left out."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from resnet_ensemble.report import read
from resnet_ensemble.report.page import Page, pct


def error_curves(workdir: str | None) -> tuple[np.ndarray, np.ndarray]:
  """(step, test error) and (step, training error) rows of a run's metrics.jsonl; training
  error is 1 - the logged training accuracy."""
  history = read.history(workdir)
  test = [(r["step"], r["eval_error"]) for r in history if "eval_error" in r]
  train = [(r["step"], 1.0 - r["train_accuracy"]) for r in history if "train_accuracy" in r]
  return np.asarray(test, np.float64), np.asarray(train, np.float64)


def fig_training(page: Page, runs: Sequence[tuple[str, str | None]]) -> None:
  """Test error (and training error, dashed) against the step for each (label, workdir)."""
  curves = []
  for label, workdir in runs:
    test, train = error_curves(workdir)
    if len(test):
      curves.append((label, test, train))
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
    text.append(f"{label}: test error {pct(test[-1, 1])} at step {int(test[-1, 0])} (lowest "
                f"{pct(test[best, 1])}, step {int(test[best, 0])}).")
  ax.set_ylim(0, min(100.0, max(40.0, 100 * min(float(c[1][0, 1]) for c in curves) + 5)))
  ax.set_title("Training curves (solid: test error, dashed: training error)")
  ax.set_xlabel("step")
  ax.set_ylabel("error (%)")
  ax.legend(fontsize=8)
  page.section("Training curves", page.save(fig, "fig_training_curves.png"), text)
