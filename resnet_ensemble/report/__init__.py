"""Figures and report.md from the experiments' JSON results (paper Fig. 3-8, E1-E10).

Every input is optional: a figure is drawn for whatever results exist, and report.md says which
experiments are missing and the command that produces each one, so a half-finished run still
gives a readable report. Numbers in the text are computed from the results, never canned.
Errors are plotted as fractions (as the paper's axes are) and written as percentages.

  read            every file the report reads (JSON and metrics.jsonl only)
  paper           the paper's numbers, each with where the paper gives it
  lesion_figures  E1-E4, E10: deleting and reordering blocks
  path_figures    E5-E7, E9: path lengths, gradient per path length, effective paths
  curves          training curves of every run given
  markdown        the table, the missing experiments' commands, report.md
"""

from __future__ import annotations

from typing import Sequence

import matplotlib

# Headless: no display is ever needed to write PNGs. Set before any submodule imports pyplot.
matplotlib.use("Agg")

from resnet_ensemble import workdir as workdir_lib  # noqa: E402
from resnet_ensemble.report import curves, lesion_figures, markdown, path_figures  # noqa: E402
from resnet_ensemble.report import read  # noqa: E402
from resnet_ensemble.report.page import Page  # noqa: E402
from resnet_ensemble.report.path_figures import decay_fit  # noqa: E402,F401

__all__ = ["write_report", "decay_fit"]


def write_report(workdir: str, *, vgg_workdir: str | None = None, sd_workdir: str | None = None,
                 effective_workdir: str | None = None, seed_workdirs: Sequence[str] = (),
                 out_dir: str | None = None, config_file: str | None = None) -> list[str]:
  """Reads the results in workdir (and the comparison workdirs), writes PNGs and report.md
  into ``out_dir`` (default: workdir). ``seed_workdirs``: more seeds of the main run (their
  final_metrics.json), for its test error's mean and spread. ``config_file``: the config the
  run was launched with, named in the commands for its missing experiments (None: the
  per-experiment default in markdown.CONFIGS), so they rerun this run and not the paper's.

  Returns the paths of the files written (figures first, report.md last).
  """
  out_dir = out_dir or workdir
  workdir_lib.path(out_dir).mkdir(parents=True, exist_ok=True)
  runs = read.read_runs(workdir, vgg_workdir=vgg_workdir, sd_workdir=sd_workdir,
                        effective_workdir=effective_workdir, seed_workdirs=seed_workdirs)
  page = Page(out_dir)

  n, n_from = read.n_blocks(runs)
  lesion_figures.fig_single(page, runs.lesion, runs.vgg, runs.seed_lesions)
  delete_k = lesion_figures.fig_delete_k(page, runs.lesion)
  lesion_figures.fig_reorder(page, runs.lesion)
  e5 = path_figures.fig_path_lengths(page, n, n_from)
  fit = path_figures.fig_gradient(page, runs.paths)
  eff = path_figures.effective(n, runs.paths)
  path_figures.fig_total_gradient(page, n, eff)
  path_figures.fig_deletion_paths(page, n, eff)
  lesion_figures.fig_stochastic_depth(page, runs.lesion, runs.sd)
  name = read.model_label(runs.lesion)
  curves.fig_training(page, [(f"{name} (seed {read.seed_of(wd)})", wd)
                             for wd in [workdir, *seed_workdirs]]
                      + [(read.model_label(runs.vgg, "plain net"), vgg_workdir),
                         (f"{name}, effective paths (E8)", effective_workdir),
                         (f"{name}, stochastic depth (E10)", sd_workdir)])

  rows = markdown.table_rows(runs, n=n, delete_k=delete_k, e5=e5, fit=fit, eff=eff)
  missing = markdown.missing_experiments(runs, n_from=n_from, config_file=config_file)
  text = markdown.render(runs, rows, page.sections, missing)
  return page.files + [workdir_lib.write_text(out_dir, "report.md", text)]
