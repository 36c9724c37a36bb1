"""Data sources: the official CIFAR-10 binary layout, the embedded digits, clear errors."""

import functools
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from resnet_ensemble import data
from tests.conftest import offline_data


def _config(**kw):
  c = ml_collections.ConfigDict(dict(name="cifar10", source="bin", dir=""))
  c.update(kw)
  return c


@pytest.fixture
def small_copies(monkeypatch):
  """data.load reads the few-record copies of these tests (the official files hold 10,000)."""
  monkeypatch.setattr(data, "read_cifar10_bin",
                      functools.partial(data.read_cifar10_bin, records_per_file=None))


def _random_split(rng, n):
  return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, n).astype(np.int32))


def test_binary_reader_round_trips_and_accepts_both_directory_forms(tmp_path, small_copies):
  rng = np.random.default_rng(0)
  train_x, train_y = _random_split(rng, 25)
  test_x, test_y = _random_split(rng, 7)
  root = data.write_cifar10_bin(str(tmp_path), train_x, train_y, test_x, test_y)
  for directory in (str(tmp_path), root):
    ds = data.load(_config(dir=directory))
    np.testing.assert_array_equal(ds.train_images, train_x)
    np.testing.assert_array_equal(ds.train_labels, train_y)
    np.testing.assert_array_equal(ds.test_images, test_x)
    np.testing.assert_array_equal(ds.test_labels, test_y)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  np.testing.assert_allclose(ds.mean, train_x.reshape(-1, 3).mean(0))


def test_binary_reader_follows_the_official_record_layout(tmp_path):
  """A record written by hand, byte by byte: label, then the R, G and B planes row-major."""
  root = tmp_path / "cifar-10-batches-bin"
  root.mkdir()
  record = np.zeros(3073, np.uint8)
  record[0] = 7                       # label
  record[1 + 0] = 11                  # R at (row 0, col 0)
  record[1 + 1024 + 32 * 2 + 5] = 22  # G at (row 2, col 5)
  record[1 + 2048 + 32 * 31 + 31] = 33  # B at (row 31, col 31)
  for name in data.CIFAR10_TRAIN_FILES + (data.CIFAR10_TEST_FILE,):
    record.tofile(root / name)
  train_x, train_y, test_x, test_y = data.read_cifar10_bin(str(tmp_path), records_per_file=1)
  assert train_x.shape == (5, 32, 32, 3) and test_x.shape == (1, 32, 32, 3)
  image = test_x[0]
  assert test_y[0] == 7 and image[0, 0, 0] == 11 and image[2, 5, 1] == 22
  assert image[31, 31, 2] == 33 and image.sum() == 11 + 22 + 33


def test_missing_and_truncated_files_are_clear_errors(tmp_path, small_copies):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    data.load(_config(dir=str(missing)))
  rng = np.random.default_rng(1)
  root = data.write_cifar10_bin(str(tmp_path), *_random_split(rng, 10), *_random_split(rng, 2))
  with open(os.path.join(root, "data_batch_3.bin"), "ab") as f:
    f.write(b"\0" * 10)
  with pytest.raises(ValueError, match="data_batch_3.bin.*truncated"):
    data.load(_config(dir=str(tmp_path)))


def _write_records(path, labels, extra_bytes=0):
  """Batch-file bytes by hand: one label byte and 3,072 pixel bytes per record."""
  records = np.zeros((len(labels), data.CIFAR10_RECORD), np.uint8)
  records[:, 0] = labels
  with open(path, "wb") as f:
    f.write(records.tobytes() + b"\0" * extra_bytes)


def _full_copy(root, n_records=10_000):
  """Every batch file of the official size (10,000 zero records, labels 0..9 in turn)."""
  os.makedirs(root, exist_ok=True)
  labels = np.arange(n_records) % 10
  for name in data.CIFAR10_TRAIN_FILES + (data.CIFAR10_TEST_FILE,):
    _write_records(os.path.join(root, name), labels)
  return labels


def test_a_short_batch_file_is_an_error_naming_it(tmp_path):
  """Whole records, but fewer than the 10,000 of every official file: a cut-off download."""
  root = tmp_path / "cifar-10-batches-bin"
  _full_copy(root)
  _write_records(root / "data_batch_4.bin", np.zeros(9_998, np.uint8))
  with pytest.raises(ValueError, match=r"data_batch_4\.bin holds 9998 records, not 10000"):
    data.read_cifar10_bin(str(tmp_path))
  _write_records(root / "data_batch_4.bin", np.zeros(10_001, np.uint8))
  with pytest.raises(ValueError, match=r"data_batch_4\.bin holds 10001 records, not 10000"):
    data.load(_config(dir=str(tmp_path)))


def test_a_label_outside_0_to_9_is_an_error_naming_the_file_and_record(tmp_path):
  root = tmp_path / "cifar-10-batches-bin"
  labels = _full_copy(root)
  bad = labels.copy()
  bad[[17, 400]] = (10, 255)
  _write_records(root / data.CIFAR10_TEST_FILE, bad)
  with pytest.raises(ValueError, match=r"test_batch\.bin: 2 labels outside 0-9 \(first: record "
                     r"17, label 10\)"):
    data.load(_config(dir=str(tmp_path)))
  # The official size read whole: the checks pass a good copy.
  _write_records(root / data.CIFAR10_TEST_FILE, labels)
  train_x, train_y, test_x, test_y = data.read_cifar10_bin(str(root))
  assert train_x.shape == (50_000, 32, 32, 3) and test_y.tolist() == labels.tolist()


def test_auto_source_lists_where_it_looked(tmp_path):
  with pytest.raises(FileNotFoundError, match="Looked for the binary release in .*nothing"):
    data.load(_config(source="auto", dir=str(tmp_path / "nothing")))


def test_embedded_digits():
  ds = data.load(_config(name="digits"))
  assert ds.train_images.shape == (1437, 8, 8, 1) and ds.test_images.shape == (360, 8, 8, 1)
  assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
  assert ds.num_classes == 10 and set(np.unique(ds.test_labels)) == set(range(10))
  again = data.load(_config(name="digits"))
  np.testing.assert_array_equal(ds.test_labels, again.test_labels)


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits, cifar10"):
    data.load(_config(name="mnist"))
  with pytest.raises(ValueError, match="unknown data source 'web'"):
    data.load(_config(source="web"))


def test_the_data_folder_is_one_environment_variable(monkeypatch, tmp_path):
  """``$RESNET_ENSEMBLE_DATA`` in a config's path is resolved when read; unset, the error names
  it; other paths keep only ``~`` expanded."""
  monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
  assert data.expand(data.DATA_DIR + "/cifar10") == str(tmp_path / "cifar10")
  assert data.exact_subset_path(data.DATA_DIR + "/x.npz") == str(tmp_path / "x.npz")
  assert data.expand("~/d") == os.path.expanduser("~/d")
  assert data.expand("/a/$RESNET_ENSEMBLE_DATA") == "/a/$RESNET_ENSEMBLE_DATA"
  monkeypatch.delenv(data.DATA_ENV)
  assert data.data_folder() is None
  with pytest.raises(FileNotFoundError, match="RESNET_ENSEMBLE_DATA is not set"):
    data.read_exact_subset(data.DATA_DIR + "/cifar10/" + data.EXACT_SUBSET_FILE)


@pytest.fixture(scope="module")
def shared_cifar(tmp_path_factory):
  """The offline CIFAR-10 pack converted to the binary layout (README "Data")."""
  converter, missing = offline_data("cifar10", "make_cifar10_bin.py")
  if converter is None:
    pytest.skip(missing)
  out = tmp_path_factory.mktemp("cifar")
  subprocess.run([sys.executable, converter, str(out)], check=True, capture_output=True)
  return out


def test_the_real_cifar10_copy(shared_cifar):
  ds = data.load(_config(dir=str(shared_cifar)))
  assert ds.train_images.shape == (50_000, 32, 32, 3) and ds.test_images.shape == (10_000, 32, 32, 3)
  assert np.bincount(ds.train_labels).tolist() == [5000] * 10
  assert ds.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # the official order
  np.testing.assert_allclose(ds.mean, [125.27, 122.93, 113.86], atol=0.5)
