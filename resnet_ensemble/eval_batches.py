"""Test batches on the device: one protocol for every evaluation source.

A *pass* over a test set is an iterable of ``(images, labels, mask)`` stacks of padded batches,
shape (S, B, ...), that the evaluators scan over (``evaluate.make_eval_fn``, the lesion forms);
``evaluate.total`` adds their sums up over the pass. Every evaluation source makes its passes
with ``eval_batches(batch_size, max_images, mesh, split=False)`` (``data.ImageDataset``,
``imagenet.StreamedValidation``), and the trainer, the lesion engine and the path gradients take
whatever it gives:

- ``Resident``: data that fits on the device (CIFAR-10, the digits) is one stack of every batch,
  placed once; every pass yields it again.
- ``Streamed``: data that does not (ImageNet validation) comes from the host a batch at a
  time, a stack of one, each process feeding its share of every batch.

``split`` says how a batch meets the devices: whole on every device (``False``: the analyses
split variants or paths over the devices instead) or its images split over them (``True``:
training's data-parallel evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from resnet_ensemble.sharding import put, replicate_local, replicated, sharded

Batch = tuple[jax.Array, jax.Array, jax.Array]  # images, labels, mask: (S, B, ...) each


class Resident:
  """A pass that is one stack of every padded batch, placed on the devices once (``images``
  (S, B, ...) uint8, ``labels`` (S, B), ``mask`` (S, B): the same on every process)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, mask: np.ndarray, mesh: Mesh,
               split: bool = False):
    where = sharded(mesh, axis=1) if split else replicated(mesh)
    self.stack: Batch = tuple(put(a, where) for a in (images, labels, mask))
    self.batch_size = images.shape[1]

  def __iter__(self) -> Iterator[Batch]:
    yield self.stack


@dataclasses.dataclass(frozen=True)
class Streamed:
  """A pass read from the host each time: ``batches()`` starts a new one, yielding this
  process's ``(images, labels, mask)`` share of every batch of ``batch_size`` images."""

  batches: Callable[[], Iterable[tuple[np.ndarray, ...]]]
  mesh: Mesh
  batch_size: int
  split: bool = False

  def __iter__(self) -> Iterator[Batch]:
    for batch in self.batches():
      yield tuple(self.place(a[None]) for a in batch)

  def place(self, local: np.ndarray) -> jax.Array:
    """A stack of one batch from every process's share of it (axis 1)."""
    if self.split:
      return jax.make_array_from_process_local_data(sharded(self.mesh, axis=1), local)
    return replicate_local(local, self.mesh, axis=1)
