"""The ImageNet input pipeline on TFDS's mock data: shapes, dtypes, labels, eval padding."""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from resnet_ensemble import imagenet

SIZE, BATCH = 32, 4


def _split(split, *, train, num_examples, seed=0):
  """All batches (eval) or the first 3 * num_examples / BATCH batches (train) of mock data."""
  with tfds.testing.mock_data(num_examples=num_examples):
    it = imagenet.make_split(split, batch_size=BATCH, image_size=SIZE, train=train,
                             data_dir=None, seed=seed, shuffle_buffer=16)
    if train:  # more batches than one pass holds: the stream repeats
      return list(itertools.islice(it, 3 * num_examples // BATCH))
    return list(it)


def test_train_batches_repeat_forever_with_uint8_crops():
  batches = _split("train", train=True, num_examples=6)
  assert len(batches) == 4  # 12 examples drawn from 6
  for batch in batches:
    assert len(batch) == 2
    images, labels = batch
    assert images.shape == (BATCH, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert labels.shape == (BATCH,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < imagenet.NUM_CLASSES
  assert np.concatenate([b[0] for b in batches]).std() > 0  # real pixels, not padding


def test_eval_is_one_pass_with_the_last_batch_padded_and_masked():
  batches = _split("validation", train=False, num_examples=6)
  assert len(batches) == 2  # 6 examples in batches of 4: 4 + (2 real, 2 padding)
  images = np.concatenate([b[0] for b in batches])
  labels = np.concatenate([b[1] for b in batches])
  mask = np.concatenate([b[2] for b in batches])
  assert images.shape == (8, SIZE, SIZE, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < imagenet.NUM_CLASSES
  assert mask.dtype == np.float32 and mask.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
  assert not images[6:].any() and images[:6].any()


def test_eval_without_padding_when_the_split_fills_whole_batches():
  batches = _split("validation", train=False, num_examples=8)
  assert len(batches) == 2 and all(b[2].all() for b in batches)


def test_eval_labels_follow_the_data():
  """Eval does not shuffle: two passes agree example by example."""
  first = _split("validation", train=False, num_examples=5)
  second = _split("validation", train=False, num_examples=5)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_global_batch_must_split_over_processes(monkeypatch):
  monkeypatch.setattr(imagenet.jax, "process_count", lambda: 3)
  with pytest.raises(ValueError, match="3"):
    _split("train", train=True, num_examples=4)


def test_train_stream_is_reproducible_from_the_seed():
  first, again, other = (_split("train", train=True, num_examples=8, seed=s)[0] for s in (0, 0, 1))
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert not np.array_equal(first[0], other[0])


def test_eval_pads_every_process_to_the_largest_share(monkeypatch):
  """2 processes, shares of 7 and 6 examples, 2 per process: both run 4 eval steps."""
  monkeypatch.setattr(imagenet.jax, "process_count", lambda: 2)
  monkeypatch.setattr(imagenet.jax, "process_index", lambda: 1)
  monkeypatch.setattr(imagenet, "_largest_share", lambda *args: 7)  # mock data has no split info
  batches = _split("validation", train=False, num_examples=6)  # this process's share: 6
  assert [b[0].shape[0] for b in batches] == [2, 2, 2, 2]
  assert np.concatenate([b[2] for b in batches]).tolist() == [1, 1, 1, 1, 1, 1, 0, 0]


def test_unprepared_data_is_a_clear_error_at_the_call(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"imagenet2012 is not prepared in data_dir={tmp_path}"):
    imagenet.make_split("validation", batch_size=4, train=False, data_dir=str(tmp_path), seed=0)


def test_train_and_evaluate_streams_imagenet_end_to_end(tmp_path, tiny, monkeypatch):
  """A tiny ImageNet ResNet-18 layout trains on mock imagenet2012 through the host pipeline."""
  from resnet_ensemble import train
  real = imagenet.make_split

  def mocked(*args, **kwargs):  # mock only the dataset construction: the mock also patches
    with tfds.testing.mock_data(num_examples=6):  # file I/O, which breaks orbax's writes
      return real(*args, **kwargs)

  monkeypatch.setattr(imagenet, "make_split", mocked)
  config = tiny(**{"model.name": "imagenet_resnet", "model.depth": 18, "model.width": 4,
                   "data.name": "imagenet2012", "data.dir": "", "data.image_size": SIZE,
                   "train.batch_size": BATCH, "train.num_steps": 4, "eval.batch_size": BATCH,
                   "optim.boundaries": (), "checkpoint.every": 0})
  # checkpoint.every=0: save only at the end, after the last eval, so no background orbax
  # write overlaps a mocked make_split (the mock's file-system patch is process-wide).
  final = train.train_and_evaluate(config, str(tmp_path / "w"))
  assert 0.0 <= final["eval_accuracy"] <= 1.0 and np.isfinite(final["eval_loss"])
  assert (tmp_path / "w" / "checkpoints" / "4").is_dir()
