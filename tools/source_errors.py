"""Test error of pretrained weights on each CIFAR-10 source: the exact-pixel test subset, and a
binary-layout copy (the official release, or the JPEG copy converted to that layout), the latter
also on the subset's own images, so the test-time cost of the JPEG pixels is read off directly.

    python tools/source_errors.py --config=configs/cifar10_pretrained.py \
        --config.weights=$RESNET_ENSEMBLE_DATA/pretrained/cifar10/resnet56-4bfd9763.th \
        --bin=~/.cache/cifar10 --bin_name="JPEG copy" --out=errors_r56.json

Each error comes with its binomial standard error, sqrt(e (1 - e) / n).
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from resnet_ensemble import data as data_lib, evaluate, pretrained_cifar

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags, defined only when this file runs as the program (the tests
  import it beside the package's CLI, which has its own --config: not defined twice)."""
  config_flags.DEFINE_config_file("config", None, "configs/cifar10_pretrained.py",
                                  lock_config=True)
  flags.DEFINE_string("bin", "", "Folder holding cifar-10-batches-bin/ ('' = the subset only).")
  flags.DEFINE_string("bin_name", "binary release", "What --bin holds, for the output.")
  flags.DEFINE_string("out", "", "JSON file to write ('' = print only).")
  flags.mark_flags_as_required(["config"])


def binomial_se(error: float, n: int) -> float:
  return math.sqrt(error * (1.0 - error) / n)


def _error(eval_fn, variables, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict:
  ds = data_lib.ImageDataset("subset", images[:0], labels[:0], images, labels, 10, (), (), "")
  batches = ds.padded_test(batch_size)
  e = float(jax.device_get(eval_fn(variables, *batches)["error"]))
  return {"images": int(len(labels)), "error": e, "se": binomial_se(e, len(labels))}


def measure(config, bin_dir: str = "", bin_name: str = "binary release",
            records_per_file: int | None = 10_000) -> dict:
  """{source: {images, error, se}} for the subset, and with ``bin_dir`` for its test split
  and for the subset's images as that copy holds them (``records_per_file``: None reads the
  small copies tests write)."""
  model, variables = pretrained_cifar.load_pretrained(config.arch, config.weights)
  c = config.data
  subset = data_lib.load_exact_subset(data_lib.exact_subset_path(c.dir), c.mean, c.std)
  eval_fn = jax.jit(evaluate.make_eval_fn(model, subset.mean, subset.std))
  bs = config.eval.batch_size
  out = {"weights": config.weights, "blocks": model.layout.n_blocks,
         "exact_subset": _error(eval_fn, variables, subset.test_images, subset.test_labels, bs)}
  if bin_dir:
    _, _, tx, ty = data_lib.read_cifar10_bin(bin_dir, records_per_file)
    indices = data_lib.read_exact_subset(data_lib.exact_subset_path(c.dir))["test_indices"]
    if not np.array_equal(ty[indices], subset.test_labels):
      raise ValueError(f"{bin_dir}'s test labels differ from the exact subset's at its indices")
    out[bin_name] = _error(eval_fn, variables, tx, ty, bs)
    out[f"{bin_name}, subset images"] = _error(eval_fn, variables, tx[indices], ty[indices], bs)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  out = measure(FLAGS.config, FLAGS.bin, FLAGS.bin_name)
  for name, r in out.items():
    if isinstance(r, dict):
      print(f"{name}: {100 * r['error']:.2f}% ± {100 * r['se']:.2f} ({r['images']} images)")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
