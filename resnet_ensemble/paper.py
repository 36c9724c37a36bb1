"""The whole paper from one config: ``--mode=all`` on a stack of runs.

A config whose ``stack`` holds the paper's runs (seeds of the full network, E8's effective
paths, E10's stochastic depth) and, with ``paper.plain``, the plain network of Fig. 3, runs the
paper end to end in one command: the stack trains as one program, the plain network beside
it, then each run gets the analyses its experiment needs and one report puts them together.
Each run's role comes from its gates: the first run without a gate sampler is the main
network (E1-E7, E9), the others without one are its seeds (their test error and E1-E4 give
the spread), the ``effective`` run is E8's, the ``stochastic_depth`` run is E10's (E1 on it:
Fig. 8). Every step is skipped when its result is there for the same run, so a stopped
command resumes where it stopped and a finished one only rewrites the report.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, NamedTuple

from resnet_ensemble import lesion, path_gradients, report, restore, train
from resnet_ensemble import workdir as workdir_lib
from resnet_ensemble.progress import format_duration, say
from resnet_ensemble.stack import Run, runs_of

PLAIN = "plain"  # the plain network's workdir, under the stack's


class Roles(NamedTuple):
  """The runs of a paper stack by what the report does with them."""
  main: Run
  seeds: tuple[Run, ...]
  effective: Run | None
  stochastic_depth: Run | None
  plain: Run | None


def is_paper(config) -> bool:
  """Does ``--mode=all`` run the whole paper (a stack of runs, or the plain network too)?"""
  return bool(config.get("stack") or len(config.get("seeds", ())) > 1
              or config.get("paper", {}).get("plain"))


def roles(config) -> Roles:
  """The runs of ``config`` by role; a ValueError naming what is missing or doubled."""
  runs = runs_of(config)
  full = [r for r in runs if r.config.gates.sampler == "none"]
  by = {s: [r for r in runs if r.config.gates.sampler == s]
        for s in ("effective", "stochastic_depth")}
  if not full:
    raise ValueError("--mode=all on a stack needs a run without a gate sampler (the full "
                     "network the others are compared with); the stack has "
                     + ", ".join(f"{r.name} ({r.config.gates.sampler})" for r in runs))
  for sampler, found in by.items():
    if len(found) > 1:
      raise ValueError(f"--mode=all on a stack: runs {', '.join(r.name for r in found)} all "
                       f"sample {sampler} gates; the report has one place for them")
  return Roles(main=full[0], seeds=tuple(full[1:]), effective=next(iter(by["effective"]), None),
               stochastic_depth=next(iter(by["stochastic_depth"]), None),
               plain=Run(PLAIN, plain_config(config)) if config.paper.plain else None)


def plain_config(config):
  """The plain network of Fig. 3 with everything else of the main run (data, recipe, seed);
  checked, with its model, when it is trained (``config.check_config``)."""
  c = config.copy_and_resolve_references()
  c.seeds, c.stack = (), ()
  c.seed = runs_of(config)[0].config.seed
  c.paper.plain = False
  c.model.name = "plain"
  c.model.plain_stages = tuple(config.paper.plain_stages)
  c.model.width = config.paper.plain_width
  c.gates.sampler = "none"
  return c


def e1_only(config):
  """``config`` with the lesion study cut to E1 (delete one block): what Fig. 3's plain panel
  and Fig. 8 need from the plain and the stochastic-depth networks."""
  c = config.copy_and_resolve_references()
  c.lesion.max_k, c.lesion.reorder_max_swaps = 0, 0
  c.lesion.exclude_downsampling_variant = False
  return c


def _done(workdir: str, name: str, config) -> bool:
  """Is ``name`` in ``workdir`` the result of this very config (nothing to recompute)?"""
  try:
    result = workdir_lib.read_json(workdir, name)
  except ValueError:  # unreadable: recompute it
    return False
  return bool(result) and result.get("config") == workdir_lib.config_dict(config)


def _trained(config, workdir: str) -> bool:
  return workdir_lib.trained(workdir, config.train.num_steps)


def _restored_once(config, workdir: str, allow_unfinished: bool,
                   sources: restore.Sources) -> Callable[[], restore.Trained]:
  """The run in ``workdir`` restored at the first call (after its training) and kept."""
  return functools.cache(lambda: restore.load_trained(config, workdir, allow_unfinished,
                                                      sources(config.data)))


def run(config, workdir: str, allow_unfinished: bool = False, config_file: str | None = None,
        sources: restore.Sources | None = None) -> list[str]:
  """Trains what is not trained, analyses what is not analysed, writes the report into
  ``workdir``; returns the report's files (figures first, report.md last). ``sources``: the
  data, loaded once for every run (the caller's, when it loaded it before the workdir was
  made); each run analysed is restored once for all its analyses."""
  r = roles(config)
  sources = restore.Sources() if sources is None else sources
  steps: list[tuple[str, Callable[[], object]]] = []
  stack_runs = runs_of(config)
  if not all(_trained(run.config, run.workdir(workdir)) for run in stack_runs):
    steps.append((f"train {', '.join(run.name for run in stack_runs)} as one program",
                  lambda: train.train_and_evaluate(config, workdir, sources(config.data))))
  if r.plain and not _trained(r.plain.config, r.plain.workdir(workdir)):
    plain = r.plain.config
    steps.append(("train the plain network", lambda: train.train_and_evaluate(
        plain, r.plain.workdir(workdir), sources(plain.data))))
  analyses = [(run, run.config, True) for run in (r.main, *r.seeds)]
  analyses += [(run, e1_only(run.config), False) for run in (r.stochastic_depth, r.plain) if run]
  for run, c, gradients in analyses:
    wd = run.workdir(workdir)
    trained = _restored_once(c, wd, allow_unfinished, sources)
    if not _done(wd, "lesion.json", c):
      steps.append((f"lesion study of {run.name}",
                    lambda c=c, wd=wd, t=trained: lesion.study(c, wd, t())))
    if gradients and run is r.main and not _done(wd, workdir_lib.gradients_file(wd), c):
      steps.append((f"path gradients of {run.name}",
                    lambda c=c, wd=wd, t=trained: path_gradients.study(c, wd, t())))
  for i, (what, step) in enumerate(steps):
    say(f"== all: {what} ({i + 1}/{len(steps)})")
    t0 = time.perf_counter()
    step()
    say(f"== done in {format_duration(time.perf_counter() - t0)}")
  return report.write_report(
      r.main.workdir(workdir), out_dir=workdir, config_file=config_file,
      vgg_workdir=r.plain.workdir(workdir) if r.plain else None,
      sd_workdir=r.stochastic_depth.workdir(workdir) if r.stochastic_depth else None,
      effective_workdir=r.effective.workdir(workdir) if r.effective else None,
      seed_workdirs=[s.workdir(workdir) for s in r.seeds])

