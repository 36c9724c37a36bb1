"""The test-time cost of the JPEG copy of CIFAR-10: one trained network evaluated on the exact
original pixels of a test subset and on the JPEG-recoded versions of the same images.

    python tools/jpeg_gap.py --config=configs/cifar10_resnet110.py --workdir=W \
        --exact=$RESNET_ENSEMBLE_DATA/cifar10/cifar10-test-exact.npz.xz

``--exact`` is an ``.npz`` (optionally ``.xz``-compressed) with ``test_images`` (N, 32, 32, 3)
uint8, ``test_indices`` (positions in the test split) and ``test_labels``. Writes
``jpeg_gap.json`` into the workdir.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from resnet_ensemble import data, evaluate, restore, workdir as workdir_lib

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags, defined only when this file runs as the program (the tests
  import it beside the package's CLI, which has its own --config: not defined twice)."""
  config_flags.DEFINE_config_file("config", None, "The trained run's config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The trained run's workdir.")
  flags.DEFINE_string("exact", None, "npz(.xz) with test_images, test_indices, test_labels.")
  flags.mark_flags_as_required(["config", "workdir", "exact"])


def load_exact(path: str) -> dict[str, np.ndarray]:
  """Reads the exact-pixel subset (``data.read_exact_subset``)."""
  return data.read_exact_subset(path)


def measure(config, workdir: str, exact_path: str) -> dict:
  """Error of the newest checkpoint on the exact pixels and on their JPEG versions."""
  t = restore.load_trained(config, workdir)
  if not isinstance(t.dataset, data.ImageDataset):
    raise ValueError(f"jpeg_gap needs CIFAR-10's test split in memory; {config.data.name} "
                     "streams from TFDS")
  exact = load_exact(exact_path)
  idx = exact["test_indices"].astype(np.int64)
  ds = t.dataset
  if idx.max() >= len(ds.test_labels) or not np.array_equal(ds.test_labels[idx],
                                                              exact["test_labels"]):
    raise ValueError(f"{exact_path} does not match the test split of {config.data.name} "
                     f"(labels differ at the given indices)")
  eval_fn = jax.jit(evaluate.make_eval_fn(t.model, ds.mean, ds.std))
  n = len(idx)
  ones = np.ones((1, n), np.float32)
  labels = exact["test_labels"].astype(np.int32)[None]

  def error(images: np.ndarray) -> float:
    return float(eval_fn(t.variables, images[None], labels, ones)["error"])

  exact_err, jpeg_err = error(exact["test_images"]), error(ds.test_images[idx])
  out = {"checkpoint_step": t.step, "images": n, "error_exact": exact_err,
         "error_jpeg": jpeg_err, "gap_points": 100.0 * (jpeg_err - exact_err),
         "mean_abs_pixel_diff": float(np.abs(exact["test_images"].astype(np.float32)
                                             - ds.test_images[idx]).mean())}
  workdir_lib.write_json(workdir, "jpeg_gap.json", out)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  out = measure(FLAGS.config, FLAGS.workdir, FLAGS.exact)
  print(f"jpeg_gap: {out['images']} test images, error exact {100 * out['error_exact']:.2f}% "
        f"vs JPEG {100 * out['error_jpeg']:.2f}% (gap {out['gap_points']:+.2f} points)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
