"""Command line: ``python -m resnet_ensemble --config=configs/NAME.py --workdir=DIR [--mode=train]``.

Any config field can be overridden with ``--config.a.b=value``; a mistyped field is an error
(``lock_config=True``).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_ensemble import checkpoint

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum("mode", "train", ["train", "lesion"],
                  "train: train (resuming); lesion: E1-E4 on the newest checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that are the user's to fix: print the message, not a traceback.
USER_ERRORS = (FileNotFoundError, checkpoint.ConfigMismatchError, FloatingPointError,
               ValueError, IndexError, ImportError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  from resnet_ensemble import train  # after flag parsing: jax reads XLA_FLAGS at import
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "lesion":
      from resnet_ensemble import lesion
      lesion.run_study(FLAGS.config, FLAGS.workdir)
  except USER_ERRORS as e:
    logging.debug("user error", exc_info=True)
    print(f"resnet_ensemble: error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
