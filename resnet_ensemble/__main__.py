"""Command line: ``python -m resnet_ensemble --config=configs/NAME.py --workdir=DIR [--mode=train]``.

Any config field can be overridden with ``--config.a.b=value``; a mistyped field is an error
(``lock_config=True``).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_ensemble import checkpoint

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum(
    "mode", "train", ["train", "lesion", "paths", "report", "all", "export"],
    "train: train (resuming); lesion: E1-E4 on the newest checkpoint; paths: E6/E7 routed "
    "gradients; report: report.md + figures from the results; all: train if no checkpoint "
    "(never with --config.weights, pretrained weights), then lesion, paths and report; "
    "export: write variables.msgpack (params and BatchNorm statistics of the newest "
    "checkpoint), which lesion/paths/report read when a workdir has no checkpoints.")
flags.DEFINE_bool("distributed", os.environ.get("RESNET_ENSEMBLE_DISTRIBUTED") == "1",
                  "Join the multi-process runtime with jax.distributed.initialize() (automatic on "
                  "Cloud TPU VMs; env RESNET_ENSEMBLE_DISTRIBUTED=1).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs "
                    "outside Cloud TPU; or env JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (or env JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's id, 0..n-1 (or env JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that are the user's to fix: print the message, not a traceback.
USER_ERRORS = (FileNotFoundError, checkpoint.ConfigMismatchError, FloatingPointError,
               ValueError, IndexError, ImportError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  from resnet_ensemble import sharding  # after flag parsing: jax reads XLA_FLAGS at import
  try:
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, auto=FLAGS.distributed)
    run_mode(FLAGS.mode, FLAGS.config, FLAGS.workdir)
  except USER_ERRORS as e:
    logging.debug("user error", exc_info=True)
    print(f"resnet_ensemble: error: {e}", file=sys.stderr)
    sys.exit(2)


def run_mode(mode: str, config, workdir: str) -> None:
  from resnet_ensemble import lesion, report, results, routing, stack, train, trained
  from resnet_ensemble.progress import format_duration, is_main_process, say
  steps = {"train": [train.train_and_evaluate], "lesion": [lesion.run_study],
           "paths": [routing.run_study], "report": [], "all": [],
           "export": [trained.export_variables]}[mode]
  checkpoints = results.path(workdir, "checkpoints")
  has_checkpoint = checkpoints.is_dir() and any(d.name.isdigit() for d in checkpoints.iterdir())
  exported = results.path(workdir, trained.VARIABLES_FILE).exists()
  imported = bool(config.get("weights"))  # pretrained weights: nothing to train
  if "weights" in config and not imported and mode != "report":
    raise ValueError("this config analyses pretrained weights: set --config.weights=PATH "
                     "(.safetensors, .pth or .pt) and --config.arch")
  if mode == "train" and imported:
    raise ValueError("--config.weights imports pretrained weights, which are not trained "
                     "here: use --mode=all (or lesion, paths, report)")
  stack.check_mode(tuple(config.get("seeds", ())), mode, workdir)
  if mode == "train" and exported and not has_checkpoint:
    raise ValueError(f"the workdir {workdir} holds the exported variables of a finished run "
                     f"({trained.VARIABLES_FILE}) and no checkpoints; train in a new workdir")
  if mode == "all":
    steps = ([] if has_checkpoint or exported or imported else [train.train_and_evaluate]) + [
        lesion.run_study, routing.run_study]
  for i, step in enumerate(steps):
    t0 = time.perf_counter()
    say(f"== {mode}: {step.__module__.split('.')[-1]} ({i + 1}/{len(steps)})")
    step(config, workdir)
    say(f"== done in {format_duration(time.perf_counter() - t0)}")
  if mode in ("report", "all") and is_main_process():
    r = config.report
    written = report.write_report(workdir, vgg_workdir=r.vgg_workdir or None,
                                  sd_workdir=r.sd_workdir or None,
                                  effective_workdir=r.effective_workdir or None,
                                  seed_workdirs=[w for w in r.seed_workdirs.split(",") if w],
                                  out_dir=r.out_dir or None)
    say(f"report: {written[-1]} and {len(written) - 1} figures")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
