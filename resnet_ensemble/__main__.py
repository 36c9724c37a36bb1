"""Command line: ``python -m resnet_ensemble --config=configs/NAME.py --workdir=DIR [--mode=train]``.

Any config field can be overridden with ``--config.a.b=value``; a mistyped field is an error
(``lock_config=True``).

The package's modules are imported inside the functions below, after flag parsing: jax reads
``XLA_FLAGS`` (and the platform) when it is first imported.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum(
    "mode", "train", ["train", "lesion", "gradients", "paths", "report", "all", "export", "runs"],
    "train: train (resuming); lesion: E1-E4 on the newest checkpoint; gradients: E6/E7, the "
    "gradient routed through paths of each length (gradients.json; 'paths' is its former name, "
    "kept as an alias); report: report.md + figures from the results; all: train (or resume) to "
    "train.num_steps unless finished (never with --config.weights, pretrained weights), then "
    "lesion, gradients and report; "
    "export: write variables.msgpack (params and BatchNorm statistics of the newest "
    "checkpoint), which lesion/gradients/report read when a workdir has no checkpoints; "
    "runs: print the workdir of each run the command trains, one a line (the workdir, or each "
    "run of a stack: --config.stack, --config.seeds), and write nothing.")
flags.DEFINE_bool("distributed", os.environ.get("RESNET_ENSEMBLE_DISTRIBUTED") == "1",
                  "Join the multi-process runtime with jax.distributed.initialize() (automatic on "
                  "Cloud TPU VMs; env RESNET_ENSEMBLE_DISTRIBUTED=1).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs "
                    "outside Cloud TPU; or env JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (or env JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's id, 0..n-1 (or env JAX_PROCESS_ID).")
flags.DEFINE_bool("allow_unfinished", False,
                  "Analyse (lesion, paths, export, all) a run that has not reached "
                  "train.num_steps; the results and the report say so. Without it such a run "
                  "is refused.")
flags.mark_flags_as_required(["config", "workdir"])

# Exit codes: 0 done; 2 a user error (one line on stderr, no traceback); 128 + signal number
# (143 SIGTERM, 130 SIGINT) a job stopped by that signal (in training, after saving its
# checkpoint; elsewhere, with what it stopped named and the lock released).
EXIT_USER_ERROR = 2
# 75 (sysexits' EX_TEMPFAIL): another job took the workdir over while this one was paused; this
# one stopped without writing, and a rerun after the other job resumes.
EXIT_LOCK_LOST = 75


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every problem (a mistyped config field, a missing or broken
  config file, a value of the wrong type, a stray argument) as one line instead of a traceback
  or the usage text."""
  from resnet_ensemble import flag_errors  # no jax inside: flags are parsed before jax loads
  return flag_errors.parse_or_exit(FLAGS, argv, "resnet_ensemble", EXIT_USER_ERROR)


class Interrupted(BaseException):
  """SIGTERM or SIGINT outside the training loop (which saves a checkpoint itself): raised in
  the main thread, so every ``with`` releases what it holds (the lock) on the way out. A
  BaseException, like KeyboardInterrupt: no ``except Exception`` (a checkpoint read's retry)
  mistakes it for a failure."""

  def __init__(self, signal_: signal.Signals):
    self.signal, self.exit_code = signal_, 128 + int(signal_)
    super().__init__(signal_.name)


_doing = {"what": "start-up"}  # what the job is doing, named when a signal stops it


def _interrupt(signum, frame) -> None:
  from resnet_ensemble import workdir  # imported by now: the handler is set after parsing
  if not workdir.defer_signal(signum):  # taking or releasing the lock: raised right after
    raise Interrupted(signal.Signals(signum))


def _redeliver_swallowed(previous):
  """An unraisable-error hook: Python swallows an exception raised inside a garbage-collector
  or ``__del__`` callback (jax has one), so an ``Interrupted`` raised there would be lost and
  the job would run on; the signal is sent again a moment later from another thread, so its
  handler runs once the main thread is back in the job's own code (raised inside this hook,
  it would be swallowed too). Swallowed again, it is sent again."""

  def hook(unraisable):
    if isinstance(unraisable.exc_value, Interrupted):
      threading.Timer(0.05, os.kill, (os.getpid(), unraisable.exc_value.signal)).start()
    else:
      previous(unraisable)

  return hook


def main(argv):
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _interrupt)
  sys.unraisablehook = _redeliver_swallowed(sys.unraisablehook)
  try:
    _main()
  except Interrupted as e:
    print(f"resnet_ensemble: {e.signal.name} during {_doing['what']}: stopped; every file is "
          f"written whole, so what was written before is kept and nothing half-written is "
          f"left, and the workdir's lock is released. Rerun the same command to go on",
          file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


def _main():
  from resnet_ensemble import checkpoint  # after flag parsing: jax reads XLA_FLAGS at import
  from resnet_ensemble import restore, sharding, stopping, workdir
  if not FLAGS["verbosity"].present:
    checkpoint.quiet_orbax()  # orbax logs every file it writes, and pages of tracebacks
  user_errors = (ValueError, IndexError, ImportError, OSError, FloatingPointError,
                 workdir.WorkdirError, checkpoint.CheckpointError,
                 restore.UnfinishedRunError)
  try:
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, auto=FLAGS.distributed)
    mode = FLAGS.mode
    if mode == "paths":
      print("resnet_ensemble: --mode=paths is now --mode=gradients (E6/E7); running that",
            file=sys.stderr, flush=True)
      mode = "gradients"
    run_mode(mode, FLAGS.config, FLAGS.workdir, FLAGS.allow_unfinished,
             config_file=config_flags.get_config_filename(FLAGS["config"]))
  except stopping.Stopped as e:
    print(f"resnet_ensemble: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except workdir.LockLostError as e:
    print(f"resnet_ensemble: stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_LOCK_LOST)
  except user_errors as e:
    logging.debug("user error", exc_info=True)
    print(f"resnet_ensemble: error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run_mode(mode: str, config, workdir: str, allow_unfinished: bool = False,
             config_file: str | None = None) -> None:
  """Runs ``mode`` on ``workdir``: validated first, then with the workdir locked.
  ``config_file``: the config's file, named in the report's commands for missing results."""
  from resnet_ensemble import config as config_lib, restore, stack, workdir as workdir_lib
  _doing["what"] = f"--mode={mode}"
  if (mode in ("train", "all") and not config.get("weights")
      and config.data.get("source") == "exact_subset"):
    raise ValueError("data.source=exact_subset is a test set (the exact-pixel CIFAR-10 test "
                     "images): evaluate on it (--mode=lesion, paths or report), never train")
  if mode != "report" and not config.get("weights"):
    model = config_lib.check_config(config)  # model and gates too, before the workdir is touched
    if mode in ("lesion", "all") and config.lesion.max_k > model.layout.n_blocks:
      raise ValueError(f"--config.lesion.max_k={config.lesion.max_k} is larger than the "
                       f"number of blocks ({model.layout.n_blocks})")
    if mode in ("train", "all"):
      config_lib.check_devices(config)
  else:
    config_lib.validate(config)
  if mode == "runs":  # the workdirs a launcher packs and unpacks
    print("\n".join(run.workdir(workdir) for run in stack.runs_of(config)), flush=True)
    return
  writes_workdir = not (mode == "report" and config.report.out_dir)
  sources = restore.Sources()
  if mode in ("train", "all"):  # the data is there (loaded, once) before the workdir is made
    _doing["what"] = f"--mode={mode}: loading the data"
    sources(config.data)
  if writes_workdir:
    workdir_lib.check_path(workdir)
  with workdir_lib.lock(workdir) if writes_workdir else contextlib.nullcontext():
    _run_mode(mode, config, workdir, allow_unfinished, config_file, sources)


def _run_mode(mode: str, config, workdir: str, allow_unfinished: bool,
              config_file: str | None, sources) -> None:
  from resnet_ensemble import (lesion, paper, path_gradients, report, restore, stack, train,
                               workdir as workdir_lib)
  from resnet_ensemble.progress import format_duration, is_main_process, say
  analyse = lambda fn: functools.partial(fn, allow_unfinished=allow_unfinished)  # noqa: E731
  train_step = ("train", lambda c, w: train.train_and_evaluate(c, w, sources(c.data)))
  # Each step: (the module that does it, as the progress lines name it; fn(config, workdir)).
  steps = {"train": [train_step], "lesion": [("lesion", analyse(lesion.run_study))],
           "gradients": [("path_gradients", analyse(path_gradients.run_study))],
           "report": [], "all": [],
           "export": [("restore", analyse(restore.export_variables))]}[mode]
  exported = workdir_lib.path(workdir, restore.VARIABLES_FILE).exists()
  imported = bool(config.get("weights"))  # pretrained weights: nothing to train
  if "weights" in config and not imported and mode != "report":
    raise ValueError("this config analyses pretrained weights: set --config.weights=PATH "
                     "(.safetensors, .pth, .pt or .th) and --config.arch")
  if mode == "train" and imported:
    raise ValueError("--config.weights imports pretrained weights, which are not trained "
                     "here: use --mode=all (or lesion, paths, report)")
  if mode == "all" and paper.is_paper(config) and not imported:
    _doing["what"] = "--mode=all: the paper's runs (paper.py)"
    written = paper.run(config, workdir, allow_unfinished, config_file, sources)
    say(f"report: {written[-1]} and {len(written) - 1} figures")
    return
  stack.check_mode(config, mode, workdir)
  latest = workdir_lib.latest_step(workdir)
  if mode == "train" and exported and latest is None:
    raise ValueError(f"the workdir {workdir} holds the exported variables of a finished run "
                     f"({restore.VARIABLES_FILE}) and no checkpoints; train in a new workdir")
  if mode == "all":
    # Train (or resume) unless the run is finished: a stopped training raises stopping.Stopped
    # before any analysis, so an unfinished network is never analysed as the trained one.
    # The run is restored once, after training, for both analyses.
    finished = (workdir_lib.trained(workdir, config.train.num_steps)
                or (latest is None and exported) or imported)
    trained = functools.cache(lambda: restore.load_trained(config, workdir, allow_unfinished,
                                                           sources(config.data)))
    steps = ([] if finished else [train_step]) + [
        ("lesion", lambda c, w: lesion.study(c, w, trained())),
        ("path_gradients", lambda c, w: path_gradients.study(c, w, trained()))]
  for i, (what, step) in enumerate(steps):
    t0 = time.perf_counter()
    _doing["what"] = f"--mode={mode}: {what}"
    say(f"== {mode}: {what} ({i + 1}/{len(steps)})")
    step(config, workdir)
    say(f"== done in {format_duration(time.perf_counter() - t0)}")
  if mode in ("report", "all") and is_main_process():
    _doing["what"] = f"--mode={mode}: report"
    r = config.report
    written = report.write_report(workdir, vgg_workdir=r.vgg_workdir or None,
                                  sd_workdir=r.sd_workdir or None,
                                  effective_workdir=r.effective_workdir or None,
                                  seed_workdirs=[w for w in r.seed_workdirs.split(",") if w],
                                  out_dir=r.out_dir or None,
                                  config_file=config_file)
    say(f"report: {written[-1]} and {len(written) - 1} figures")


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
