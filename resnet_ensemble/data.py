"""Small image datasets held in memory as uint8, ready to live on the device: evaluation
sources whose passes are one stack of batches placed once (``eval_batches.Resident``).

Sources, in the order users have them: TFDS ``cifar10``; the official binary release
directory ``cifar-10-batches-bin/`` (parsed with numpy: the pickled python release is never
unpickled, since unpickling runs code); scikit-learn's digits, real images that ship inside
the package, so the quickstart runs offline; and the exact-pixel CIFAR-10 test subset
(``exact_subset``: test images only, to evaluate networks trained elsewhere on real pixels).

The offline data folder (``$RESNET_ENSEMBLE_DATA``, see ``expand``) holds ``cifar10/`` (the
JPEG-recoded pack, its converter to the binary layout, and the exact-pixel test subset
``cifar10-test-exact.npz.xz``) and ``pretrained/cifar10/*.th`` (published CIFAR ResNets).

Inputs are normalised per channel with the train split's mean and std unless ``data.mean`` and
``data.std`` name others (a network trained elsewhere expects the normalisation it was trained
with).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import lzma
import os

import numpy as np
from etils import epath  # local paths or gs:// alike

from resnet_ensemble.eval_batches import Resident
from resnet_ensemble.sharding import put, replicated

CIFAR10_RECORD = 1 + 32 * 32 * 3  # label byte, then 1024 R, 1024 G, 1024 B (row-major)
CIFAR10_RECORDS_PER_FILE = 10_000  # each of the six official batch files, train and test
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
# The one setting that names the offline data folder. Configs keep the variable unexpanded in
# their paths ("$RESNET_ENSEMBLE_DATA/cifar10"), so a run's stored settings and its report name
# no machine's folders; ``expand`` resolves it when a file is read.
DATA_ENV = "RESNET_ENSEMBLE_DATA"
DATA_DIR = "$" + DATA_ENV
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """Train/test splits on the host as uint8 NHWC, small enough to live on the device."""

  name: str
  train_images: np.ndarray  # uint8 (N, H, W, C)
  train_labels: np.ndarray  # int32 (N,)
  test_images: np.ndarray   # uint8
  test_labels: np.ndarray   # int32
  num_classes: int
  mean: tuple[float, ...]   # per-channel mean of the train split, 0..255 units
  std: tuple[float, ...]
  source: str               # where it came from, for reports
  gradient_split: str = "train (un-augmented)"  # where E6's batches come from

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])

  def padded_test(self, batch_size: int, max_images: int = 0):
    """The first ``max_images`` test images (0: all) as (n_batches, B, ...) uint8 images,
    int32 labels and a float mask (0 for the padding of the last batch)."""
    images, labels = self.test_images, self.test_labels
    if max_images:
      images, labels = images[:max_images], labels[:max_images]
    n = len(labels)
    n_batches = -(-n // batch_size)
    pad = n_batches * batch_size - n
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
    labels = np.concatenate([labels, np.zeros((pad,), np.int32)])
    mask = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
    shape = (n_batches, batch_size)
    return images.reshape(shape + images.shape[1:]), labels.reshape(shape), mask.reshape(shape)

  def test_batches(self, batch_size: int, max_images: int = 0):
    """One pass over ``padded_test``'s batches, one (images, labels, mask) at a time."""
    return zip(*self.padded_test(batch_size, max_images))

  def eval_batches(self, batch_size: int, max_images: int, mesh,
                   split: bool = False) -> Resident:
    """The evaluation source's passes (``eval_batches``): ``padded_test`` on the devices, once."""
    return Resident(*self.padded_test(batch_size, max_images), mesh, split)

  def gradient_batches(self, batch_size: int, seed: int, max_images: int, mesh):
    """E6's batches on every device, endless: a random training batch per chunk of paths,
    fixed by (seed, chunk) (``max_images`` concerns the test split; unused here)."""
    del max_images
    for chunk in itertools.count():
      idx = np.random.default_rng([seed, chunk]).choice(len(self.train_labels), batch_size,
                                                        replace=False)
      yield (put(self.train_images[idx], replicated(mesh)),
             put(self.train_labels[idx], replicated(mesh)))


def _dataset(name, train_x, train_y, test_x, test_y, num_classes, source) -> ImageDataset:
  flat = train_x.reshape(-1, train_x.shape[-1]).astype(np.float64)
  return ImageDataset(name, train_x, train_y.astype(np.int32), test_x, test_y.astype(np.int32),
                      num_classes, tuple(float(m) for m in flat.mean(0)),
                      tuple(float(s) for s in flat.std(0)), source)


def load_digits(num_test: int = 360) -> ImageDataset:
  """scikit-learn's 1,797 real 8x8 digits (0..16 grey levels) as uint8, fixed split."""
  from sklearn.datasets import load_digits as sk_digits
  digits = sk_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))
  images, labels = images[order], labels[order]
  return _dataset("digits", images[:-num_test], labels[:-num_test], images[-num_test:],
                  labels[-num_test:], 10, "scikit-learn digits (embedded, 8x8 grey)")


def data_folder() -> str | None:
  """The offline data folder ``$RESNET_ENSEMBLE_DATA`` (None where it is unset): the only
  place the package reads the variable."""
  return os.environ.get(DATA_ENV) or None


def expand(path: str) -> str:
  """A path from a config or flag, with ``~`` and a leading ``$RESNET_ENSEMBLE_DATA`` resolved;
  the variable unset is an error naming it, rather than a "file not found" for a literal
  ``$RESNET_ENSEMBLE_DATA/...`` folder."""
  path = os.fspath(path)
  if path == DATA_DIR or path.startswith(DATA_DIR + "/"):
    folder = data_folder()
    if folder is None:
      raise FileNotFoundError(
          f"{path}: {DATA_ENV} is not set; set it to the data folder (holding cifar10/ and "
          "pretrained/cifar10/, see README 'Data'), or pass the file's own path")
    path = folder + path[len(DATA_DIR):]
  return os.path.expanduser(path)


def _bin_dir(directory: str) -> str:
  directory = expand(directory)
  nested = os.path.join(directory, "cifar-10-batches-bin")
  return nested if os.path.isdir(nested) else directory


def _read_records(path: str, records: int | None) -> tuple[np.ndarray, np.ndarray]:
  """One batch file; a cut-off or foreign file is an error naming it, since a silently short
  split or out-of-range label would only show up later as a wrong error rate."""
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size == 0 or raw.size % CIFAR10_RECORD:
    raise ValueError(f"{path} has {raw.size} bytes, not a whole number of {CIFAR10_RECORD}-byte "
                     "CIFAR-10 records: the file is truncated or not CIFAR-10 binary")
  rows = raw.reshape(-1, CIFAR10_RECORD)
  if records is not None and len(rows) != records:
    raise ValueError(f"{path} holds {len(rows)} records, not {records}: each official CIFAR-10 "
                     f"batch file holds {records} records of {CIFAR10_RECORD} bytes, so the file "
                     "is truncated or not one of them")
  labels = rows[:, 0].astype(np.int32)
  bad = np.flatnonzero(labels >= len(CIFAR10_LABELS))
  if bad.size:
    raise ValueError(f"{path}: {bad.size} labels outside 0-9 (first: record {bad[0]}, label "
                     f"{labels[bad[0]]}): not a CIFAR-10 batch file")
  images = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def read_cifar10_bin(directory: str, records_per_file: int | None = CIFAR10_RECORDS_PER_FILE):
  """(train_images, train_labels, test_images, test_labels) from the official binary layout.

  ``directory`` is ``cifar-10-batches-bin/`` itself or the folder that contains it. Every file
  must hold ``records_per_file`` records (None: any whole number, for the small copies that
  ``write_cifar10_bin`` makes in tests) with labels 0-9."""
  root = _bin_dir(directory)
  paths = [os.path.join(root, f) for f in CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
        "CIFAR-10 binary files not found: " + ", ".join(missing) + ". Set --config.data.dir to "
        "the folder holding cifar-10-batches-bin/ (the official 'CIFAR-10 binary version', or "
        "make one offline with $RESNET_ENSEMBLE_DATA/cifar10/make_cifar10_bin.py DIR).")
  train = [_read_records(p, records_per_file) for p in paths[:-1]]
  test_x, test_y = _read_records(paths[-1], records_per_file)
  return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
          test_x, test_y)


def write_cifar10_bin(directory: str, train_images, train_labels, test_images, test_labels):
  """Writes ``directory/cifar-10-batches-bin/`` in the official layout (for tests and tools)."""
  root = os.path.join(directory, "cifar-10-batches-bin")
  os.makedirs(root, exist_ok=True)

  def records(images, labels):
    planes = np.asarray(images, np.uint8).transpose(0, 3, 1, 2).reshape(len(labels), -1)
    return np.concatenate([np.asarray(labels, np.uint8)[:, None], planes], axis=1)

  for name, idx in zip(CIFAR10_TRAIN_FILES, np.array_split(np.arange(len(train_labels)), 5)):
    records(train_images[idx], train_labels[idx]).tofile(os.path.join(root, name))
  records(test_images, test_labels).tofile(os.path.join(root, CIFAR10_TEST_FILE))
  with open(os.path.join(root, "batches.meta.txt"), "w") as f:
    f.write("\n".join(CIFAR10_LABELS) + "\n")
  return root


def load_cifar10_tfds(data_dir: str | None) -> ImageDataset:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("TFDS is not installed: pip install 'resnet-ensemble[tfds]', or use "
                      "--config.data.source=bin") from e
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    splits = {s: tfds.as_numpy(tfds.load("cifar10", split=s, batch_size=-1, data_dir=data_dir,
                                          download=False)) for s in ("train", "test")}
  except (AssertionError, FileNotFoundError, OSError) as e:
    raise FileNotFoundError(f"TFDS cifar10 is not prepared in data_dir={data_dir or '~/tensorflow_datasets'}"
                            f" ({e})") from e
  return _dataset("cifar10", splits["train"]["image"], splits["train"]["label"],
                  splits["test"]["image"], splits["test"]["label"], 10,
                  f"TFDS cifar10 (data_dir={data_dir or 'default'})")


def _tfds_available() -> bool:
  try:
    import tensorflow_datasets  # noqa: F401
    return True
  except ImportError:
    return False


EXACT_SUBSET_FILE = "cifar10-test-exact.npz.xz"
EXACT_SUBSET = "exact_subset"


def read_exact_subset(path: str) -> dict[str, np.ndarray]:
  """The exact-pixel test subset: an ``.npz`` (optionally ``.xz``-compressed) holding
  ``test_images`` (N, 32, 32, 3) uint8, ``test_indices`` (positions in the test split) and
  ``test_labels``. A missing file or array is an error naming it; nothing is unpickled."""
  path = expand(path)
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"exact test subset not found: {path}")
  raw = epath.Path(path).read_bytes()
  if path.endswith(".xz"):
    raw = lzma.decompress(raw)
  with np.load(io.BytesIO(raw), allow_pickle=False) as z:
    missing = {"test_images", "test_indices", "test_labels"} - set(z.files)
    if missing:
      raise ValueError(f"{path} lacks arrays {sorted(missing)} (has {sorted(z.files)})")
    out = {k: z[k] for k in ("test_images", "test_indices", "test_labels")}
  images, labels = out["test_images"], out["test_labels"]
  if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels) or len(
      out["test_indices"]) != len(labels):
    raise ValueError(f"{path}: test_images must be uint8 (N, H, W, C) with N labels and "
                     f"indices; got {images.dtype} {images.shape}, {len(labels)} labels, "
                     f"{len(out['test_indices'])} indices")
  return out


def exact_subset_path(directory: str) -> str:
  """``data.dir`` for ``exact_subset``: the file itself or the folder holding it."""
  directory = expand(directory)
  return (os.path.join(directory, EXACT_SUBSET_FILE) if os.path.isdir(directory)
          else directory)


def load_exact_subset(path: str, mean, std) -> ImageDataset:
  """The exact-pixel test subset as a dataset to evaluate on (it has no train split of its
  own: its "train" split is the same images, which only E6's gradient batches read; the CLI
  never trains on it). ``mean``/``std``: the normalisation the network was trained with."""
  if not mean or not std:
    raise ValueError(
        "data.source=exact_subset has no train split to take the input normalisation from: "
        "set --config.data.mean and --config.data.std to the ones the network was trained "
        "with (0..255 units)")
  z = read_exact_subset(path)
  bad = np.flatnonzero(z["test_labels"] >= len(CIFAR10_LABELS))
  if bad.size:
    raise ValueError(f"{path}: {bad.size} labels outside 0-9: not CIFAR-10")
  x, y = z["test_images"], z["test_labels"].astype(np.int32)
  return ImageDataset("cifar10", x, y, x, y, 10, tuple(mean), tuple(std),
                      f"CIFAR-10 exact-pixel test subset ({len(y)} original test images, "
                      f"{os.path.basename(path)}; E6 batches from these test images)",
                      gradient_split="test (the exact subset has no train split)")


def _normalised(dataset: ImageDataset, mean, std) -> ImageDataset:
  """``dataset`` normalised with ``mean``/``std`` (0..255 units) instead of its train split's
  own; () keeps those."""
  if not mean and not std:
    return dataset
  channels = dataset.input_shape[-1]
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f"data.mean={tuple(mean)} and data.std={tuple(std)} must give one value "
                     f"per channel ({channels} for {dataset.name})")
  if any(not float(s) > 0 for s in std):
    raise ValueError(f"data.std={tuple(std)}: every std must be > 0")
  return dataclasses.replace(dataset, mean=tuple(float(m) for m in mean),
                             std=tuple(float(s) for s in std))


def load(data_config) -> ImageDataset:
  """The dataset named by ``config.data``: digits | cifar10 (source auto | bin | tfds |
  exact_subset), normalised with ``data.mean``/``data.std`` where they are set."""
  mean, std = tuple(data_config.get("mean", ())), tuple(data_config.get("std", ()))
  return _normalised(_load(data_config), mean, std)


def _load(data_config) -> ImageDataset:
  name, source = data_config.name, data_config.source
  if name == "digits":
    return load_digits()
  if name != "cifar10":
    raise ValueError(f"unknown dataset {name!r} for in-memory training; valid: digits, cifar10 "
                     "(imagenet2012 streams from TFDS)")
  if source not in ("auto", "bin", "tfds", EXACT_SUBSET):
    raise ValueError(f"unknown data source {source!r}; valid: auto, bin, tfds, {EXACT_SUBSET}")
  if source == EXACT_SUBSET:
    return load_exact_subset(exact_subset_path(data_config.dir),
                             tuple(data_config.get("mean", ())),
                             tuple(data_config.get("std", ())))
  root = _bin_dir(data_config.dir)
  if source == "bin" or (source == "auto" and os.path.isdir(root)
                         and os.path.isfile(os.path.join(root, CIFAR10_TEST_FILE))):
    return _dataset("cifar10", *read_cifar10_bin(data_config.dir), 10,
                    f"CIFAR-10 binary ({os.path.basename(root)})")
  if source == "tfds" or _tfds_available():
    try:
      return load_cifar10_tfds(data_config.dir if source == "tfds" else None)
    except (FileNotFoundError, ImportError) as e:
      if source == "tfds":
        raise
      tfds_error = str(e)
  else:
    tfds_error = "tensorflow_datasets not installed"
  raise FileNotFoundError(f"CIFAR-10 not found. Looked for the binary release in {root} and "
                          f"for TFDS cifar10 ({tfds_error}). Set --config.data.dir.")


NUM_CLASSES = {"digits": 10, "cifar10": 10, "imagenet2012": 1000}


def num_classes(name: str) -> int:
  """Classes of dataset ``name``, known before (and without) loading it."""
  if name not in NUM_CLASSES:
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(NUM_CLASSES)}")
  return NUM_CLASSES[name]
