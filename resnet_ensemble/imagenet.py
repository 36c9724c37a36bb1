"""ImageNet (TFDS ``imagenet2012``) host input pipeline: standard crops, uint8 out.

ImageNet does not fit on the device, so unlike CIFAR it streams from a tf.data pipeline on each
host. Each process reads only its own share of the files (``tfds.split_for_jax_process``) and
yields its share of every global batch; normalisation happens on the device, in the step.
TensorFlow is imported lazily, so the package works without it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnet_ensemble.eval_batches import Streamed
from resnet_ensemble.sharding import check_divisible, replicate_local

NUM_CLASSES = 1000
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _tf():
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("ImageNet needs TensorFlow Datasets: pip install 'resnet-ensemble[tfds]'") from e
  tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerators JAX uses
  return tf, tfds


def _train_crop(tf, image_bytes, key, size: int):
  """Inception-style random-resized crop (area 8-100 %, aspect 3/4-4/3) and a random flip.

  Stateless ops keyed per example, so a seed gives the same stream; only the crop window of
  the JPEG is decoded (as the Flax ImageNet example does), which halves the host's work.
  """
  keys = tf.random.experimental.stateless_split(key, 2)
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.io.extract_jpeg_shape(image_bytes), tf.zeros([1, 0, 4], tf.float32), seed=keys[0],
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
  image = tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)
  image = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear",
                          antialias=True)
  return tf.image.stateless_random_flip_left_right(image, keys[1])


def _eval_crop(tf, image_bytes, size: int):
  """Resize the shorter side to size*256/224, then take the central size x size crop."""
  image = tf.cast(tf.io.decode_jpeg(image_bytes, channels=3), tf.float32)
  resize = int(round(size * 256 / 224))
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  top = (new[0] - size) // 2
  left = (new[1] - size) // 2
  return image[top:top + size, left:left + size]


def make_split(split: str, *, batch_size: int, train: bool, image_size: int = 224,
               data_dir: str | None = None, seed: int = 0,
               shuffle_buffer: int = 10_000) -> Iterator[tuple[np.ndarray, ...]]:
  """This process's share of every global batch of ``split``.

  Train: ``(images uint8 (b, S, S, 3), labels int32)`` forever (shuffled, augmented).
  Eval: one pass of ``(images, labels, mask)``, the last batch padded (mask 0 on padding);
  with several processes every process yields as many batches (the largest share's count),
  since a jitted step over a multi-process mesh needs all of them. Errors (batch size, data
  not prepared) raise here, at the call, not at the first ``next``.
  """
  count, index = jax.process_count(), jax.process_index()
  if batch_size <= 0 or batch_size % count:
    raise ValueError(f"batch size {batch_size} is not divisible by {count} processes")
  local = batch_size // count
  tf, tfds = _tf()
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  try:
    ds = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=train,
                            read_config=tfds.ReadConfig(shuffle_seed=seed),
                            decoders={"image": tfds.decode.SkipDecoding()})
  except AssertionError as e:  # TFDS's "could not find data in ..."
    raise FileNotFoundError(
        f"TFDS imagenet2012 is not prepared in data_dir={data_dir or '~/tensorflow_datasets'}: "
        "download the ILSVRC2012 tars by hand and prepare it, see "
        f"https://www.tensorflow.org/datasets/catalog/imagenet2012 ({e})") from e

  def prepare(image, label, mask):
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return {"image": tf.ensure_shape(image, [image_size, image_size, 3]),
            "label": tf.cast(label, tf.int32), "mask": mask}

  if train:
    ds = ds.repeat().shuffle(shuffle_buffer, seed=seed).enumerate()
    base = tf.constant([seed, index], tf.int64)
    ds = ds.map(lambda i, ex: prepare(
        _train_crop(tf, ex["image"], tf.random.experimental.stateless_fold_in(base, i),
                    image_size), ex["label"], tf.constant(1.0)),
                num_parallel_calls=tf.data.AUTOTUNE)
  else:
    # Every process runs as many eval steps: pad with masked zeros up to the largest share.
    largest = _largest_share(tfds, builder, split, count) if count > 1 else int(ds.cardinality())
    if largest < 0:
      raise ValueError(f"imagenet2012 {split!r}: unknown number of examples")
    ds = ds.map(lambda ex: prepare(_eval_crop(tf, ex["image"], image_size), ex["label"],
                                   tf.constant(1.0)), num_parallel_calls=tf.data.AUTOTUNE)
    filler = {"image": tf.zeros([image_size, image_size, 3], tf.uint8),
              "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0, tf.float32)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat())
    ds = ds.take(-(-largest // local) * local)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  if train:
    return ((b["image"], b["label"]) for b in tfds.as_numpy(ds))
  return ((b["image"], b["label"], b["mask"]) for b in tfds.as_numpy(ds))


def _largest_share(tfds, builder, split: str, count: int) -> int:
  """Examples in the largest of the ``count`` process shares of ``split`` (from TFDS's info)."""
  return max(builder.info.splits[s].num_examples
             for s in tfds.even_splits(split, n=count, drop_remainder=False))


@dataclasses.dataclass(frozen=True)
class StreamedValidation:
  """ImageNet validation as an evaluation source (``eval_batches``), for the trainer's
  evaluation and the analyses: it stays on the host and streams its batches
  (``eval_batches.Streamed``)."""

  image_size: int = 224
  data_dir: str | None = None
  name: str = "imagenet2012"
  num_classes: int = NUM_CLASSES
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  @property
  def source(self) -> str:
    resize = int(round(self.image_size * 256 / 224))
    return (f"TFDS imagenet2012 validation (data_dir={self.data_dir or 'default'}), resize "
            f"{resize} / center crop {self.image_size}")

  gradient_split = "validation"

  def test_batches(self, batch_size: int,
                   max_images: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
    """One pass of this process's ``(images, labels, mask)`` shares, as ``make_split``;
    ``max_images`` > 0 keeps the first that many images in global batch order (the rest of
    their batch masked, later batches not read)."""
    stream = make_split("validation", batch_size=batch_size, train=False,
                        image_size=self.image_size, data_dir=self.data_dir)
    return capped(stream, batch_size, max_images) if max_images > 0 else stream

  def eval_batches(self, batch_size: int, max_images: int, mesh,
                   split: bool = False) -> Streamed:
    """The evaluation source's passes (``eval_batches``): each a new read of ``test_batches``."""
    check_divisible(batch_size, mesh, "eval.batch_size")
    return Streamed(lambda: self.test_batches(batch_size, max_images), mesh,
                                 batch_size, split)

  def gradient_batches(self, batch_size: int, seed: int, max_images: int,
                       mesh) -> Iterator[tuple[jax.Array, jax.Array]]:
    """E6's batches on every device (no resident train split): the whole validation batches
    among the first ``max_images`` images, in order, cycled when the chunks of paths outnumber
    them. A padded batch would bias the mean loss, so only batches whole on every process
    count."""
    del seed  # the validation order is fixed
    check_divisible(batch_size, mesh, "paths.batch_size")
    while True:
      whole = 0
      for images, labels, mask in self.test_batches(batch_size, max_images):
        if on_every_process(bool(mask.all())):
          whole += 1
          yield replicate_local(images, mesh), replicate_local(labels, mesh)
      if not whole:
        raise ValueError(f"E6 needs a whole batch of paths.batch_size={batch_size} images, but "
                         f"the validation stream (eval.max_images={max_images}) holds fewer")


def on_every_process(flag: bool) -> bool:
  """``flag`` and-ed over the processes of a multi-process run."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def capped(stream, batch_size: int, max_images: int) -> Iterator[tuple[np.ndarray, ...]]:
  """``stream``'s eval batches cut to the first ``max_images`` images of the global order
  (process p's share of batch b holds global positions b * batch + p * share + i)."""
  offset = jax.process_index() * (batch_size // jax.process_count())
  for b, (images, labels, mask) in enumerate(stream):
    start = b * batch_size
    if start >= max_images:
      return
    position = start + offset + np.arange(len(mask))
    yield images, labels, np.where(position < max_images, mask, 0.0).astype(mask.dtype)
