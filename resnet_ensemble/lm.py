"""Command line of the transformer experiments:
``python -m resnet_ensemble.lm --config=configs/lm_bytes.py --workdir=DIR --mode=all``.

Modes (the ResNets' names and files): train: trains ``model.*`` on the training text for
``train.steps`` steps (checkpoints, metrics.jsonl, final_metrics.json; resumes), then writes
the model as a Hugging Face folder ``WORKDIR/model`` (``--config.weights`` reads it, with
``--config.data.tokenizer=bytes``; so does ``transformers``); lesion: E1, E3,
E4 and the painters interventions (lesion.json); gradients: E6/E7 and the E5/E9 counts
(gradients.json); report: report.md and figures from those; all: train (when ``train.steps``),
lesion, gradients, report; eval: the intact model and the variant of
``--config.variant.order``/``gates`` (variant.json). The model is trained here
(``train.steps``), a local Hugging Face folder (``--config.weights``) or a freshly initialised
one (``model.*``, seeded).

Exit codes: 0 done; 143/130 stopped by SIGTERM/SIGINT during training (saved: rerun to go
on); 75 the workdir's lock was taken by another job; 2 a user error, one line on stderr (an unknown architecture or config
field, a model folder whose shapes do not match, a missing tokenizer, a text shorter than one
window, gates of the wrong length, an index array that is not a valid order).
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/lm_*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for the results and the report.")
MODES = ("train", "lesion", "gradients", "report", "all", "eval")
flags.DEFINE_enum("mode", "all", list(MODES), "train: train.steps steps on the training text; "
                  "lesion: E1-E4 (lesion.json); gradients: E6/E7 (gradients.json); report: "
                  "report.md + figures; all: train (when train.steps), lesion, gradients, "
                  "report; eval: the intact model and --config.variant (variant.json).")
flags.mark_flags_as_required(["config", "workdir"])

PROG = "resnet_ensemble.lm"
EXIT_USER_ERROR = 2
MODEL_FOLDER = "model"  # the trained model as a Hugging Face folder (config.json, safetensors)
EXIT_LOCK_LOST = 75  # another job took the workdir (as python -m resnet_ensemble)


def parse_flags(argv: list[str]) -> list[str]:
  from resnet_ensemble import flag_errors
  return flag_errors.parse_or_exit(FLAGS, argv, PROG, EXIT_USER_ERROR,
                                   fields_in="resnet_ensemble/lm_config.py")


def run_mode(mode: str, config, workdir: str) -> list[str]:
  """Runs ``mode``; returns the files written. User errors are ValueErrors (one line)."""
  import dataclasses
  from resnet_ensemble import lm_study, lm_train, transformer_import, workdir as workdir_lib
  from resnet_ensemble.progress import format_duration, say
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
  trains = mode in ("train", "all") and bool(config.train.steps)
  if mode == "train" and not trains:
    raise ValueError("--mode=train needs --config.train.steps > 0")
  subject = None
  if mode != "report":  # every input checked before the workdir is made
    # load validates the config; a model trained here is restored for the analyses alone,
    # trained (or resumed) by train and all.
    subject = lm_study.load(config, workdir, restore=not trains)
    if mode == "eval":
      lm_study.variant_of(config, subject.layout.n_layers)
  workdir_lib.check_path(workdir)
  written = []
  with workdir_lib.lock(workdir):
    if trains:
      t0 = time.perf_counter()
      say(f"== {mode}: train ({config.train.steps} steps)")
      variables, final = lm_train.train(config, workdir, subject.model, subject.train_tokens,
                                        subject.windows)
      subject = dataclasses.replace(subject, variables=variables)
      written.append(str(workdir_lib.path(workdir, "final_metrics.json")))
      written += transformer_import.save_folder(subject.model, variables,
                                                str(workdir_lib.path(workdir, MODEL_FOLDER)))
      say(f"== done in {format_duration(time.perf_counter() - t0)}: held-out loss "
          f"{final['held_out_loss']:.4f} nats/token")
    steps = {"train": [], "lesion": [lm_study.run_lesion], "gradients": [lm_study.run_gradients],
             "all": [lm_study.run_lesion, lm_study.run_gradients], "report": [],
             "eval": [lm_study.run_variant]}[mode]
    names = {lm_study.run_lesion: "lesion.json",
             lm_study.run_gradients: workdir_lib.GRADIENTS_FILE,
             lm_study.run_variant: "variant.json"}
    for step in steps:
      t0 = time.perf_counter()
      say(f"== {mode}: {step.__name__}")
      step(config, workdir, subject)
      written.append(str(workdir_lib.path(workdir, names[step])))
      say(f"== done in {format_duration(time.perf_counter() - t0)}")
    if mode in ("report", "all"):
      from resnet_ensemble.report import lm_report
      files = lm_report.write_report(workdir, resnet_workdir=config.report.resnet or None)
      say(f"report: {files[-1]} and {len(files) - 1} figures")
      written += files
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from resnet_ensemble import (checkpoint, lm_eval, stopping, transformer, transformer_import,
                               workdir as workdir_lib)
  if not FLAGS["verbosity"].present:
    checkpoint.quiet_orbax()
  user_errors = (ValueError, IndexError, ImportError, OSError, workdir_lib.WorkdirError,
                 transformer.InputError, transformer_import.ModelFolderError, lm_eval.TextError,
                 checkpoint.CheckpointError, FloatingPointError)
  try:
    run_mode(FLAGS.mode, FLAGS.config, FLAGS.workdir)
  except stopping.Stopped as e:  # a signal during training: saved, rerun to go on
    print(f"{PROG}: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except workdir_lib.LockLostError as e:
    print(f"{PROG}: stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_LOCK_LOST)
  except user_errors as e:
    logging.debug("user error", exc_info=True)
    print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
