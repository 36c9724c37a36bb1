"""Training feeds: where each step's batch comes from, fixed by (seed, step).

Small datasets (CIFAR-10, the embedded digits) live on the device as uint8 and each step
selects and augments its own batch, several steps per compiled call (a ``lax.scan``);
ImageNet streams from a host pipeline. Both evaluate the same way (``TestEvaluation``): one
pass over their evaluation source's test batches (``eval_batches``), split over the devices.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import numpy as np

from resnet_ensemble import conv, data as data_lib, imagenet
from resnet_ensemble.augment import batch_indices, random_crop_flip
from resnet_ensemble.evaluate import make_eval_fn, total
from resnet_ensemble.progress import say
from resnet_ensemble.sharding import check_divisible, put, replicated, sharded
from resnet_ensemble.stack import RunStack
from resnet_ensemble.state import TrainState


@flax.struct.dataclass
class ResidentTrain:
  """A train split on the device, flat and replicated: each step gathers its own batch."""
  train_images: jax.Array  # uint8 (N, H, W, C)
  train_labels: jax.Array  # int32 (N,)


def put_train(dataset: data_lib.ImageDataset, mesh) -> ResidentTrain:
  rep = replicated(mesh)
  return ResidentTrain(train_images=put(dataset.train_images, rep),
                       train_labels=put(dataset.train_labels.astype(np.int32), rep))


class TestEvaluation:
  """Training's evaluation, the same for every feed: one pass over the evaluation source's
  test batches, their images split over the devices (data parallel), every run of a stack
  evaluated with its own variables and gates."""

  def __init__(self, source, model, config, mesh, stack: RunStack):
    check_divisible(config.eval.batch_size, mesh, "eval.batch_size")
    self.batches = source.eval_batches(config.eval.batch_size, 0, mesh, split=True)
    eval_fn = make_eval_fn(model, source.mean, source.std, config.eval.conv_groups)
    self._eval = jax.jit(stack.vmap(eval_fn, (0, None, None, None, 0)),
                         out_shardings=replicated(mesh))

  def __call__(self, variables, gates=None) -> dict:
    """``{eval_loss, eval_accuracy, eval_error}``: scalars, or one value per run of a stack
    (``gates``: None, or each run's, stacked)."""
    out = total(self._eval(variables, *batch, gates) for batch in self.batches)
    return {f"eval_{k}": out[k] for k in ("loss", "accuracy", "error")}


class RunKeys(NamedTuple):
  """The random streams of a run, all from its seed: batch order, augmentation, gates."""
  order: jax.Array
  augment: jax.Array
  gates: jax.Array


def run_keys(seed) -> RunKeys:
  """``seed``: an int or a traced uint32 (a stack of runs passes each run's own)."""
  root = jax.random.key(seed)
  return RunKeys(*(jax.random.fold_in(root, i) for i in (1, 2, 3)))


def make_resident_train_fn(train_on_batch: Callable, *, batch_size: int, crop_padding: int,
                           flip: bool, num_steps: int) -> Callable:
  """``fn(state, data, seed, run) -> (state, metrics)`` running ``num_steps`` steps on resident
  data (``run``: the run's index in its stack, which picks its gate sampler).

  The batch, augmentation and gates of step t depend only on (seed, t). The seed and the run
  are arguments, not constants, so the function can be vmapped over a stack of runs."""

  def train_fn(state: TrainState, data: ResidentTrain, seed, run):
    keys = run_keys(seed)

    def one_step(state: TrainState):
      idx = batch_indices(keys.order, state.step, data.train_labels.shape[0], batch_size)
      images = random_crop_flip(jax.random.fold_in(keys.augment, state.step),
                                data.train_images[idx], crop_padding, flip)
      return train_on_batch(state, images, data.train_labels[idx], keys.gates, run)

    if num_steps == 1:
      return one_step(state)
    state, stacked = jax.lax.scan(lambda s, _: one_step(s), state, None, length=num_steps)
    return state, stacked.reduce()

  return train_fn


class ResidentFeed:
  """A small dataset on the device; each compiled call runs k steps that pick their batches."""

  def __init__(self, config, mesh, dataset: data_lib.ImageDataset | None = None):
    """``dataset``: ``config.data`` loaded already (``--mode=all`` loads it once per job)."""
    self.dataset = data_lib.load(config.data) if dataset is None else dataset
    d = self.dataset
    say(f"data: {d.source} ({len(d.train_labels)} train, {len(d.test_labels)} test)")
    self.config, self.mesh = config, mesh
    self.num_classes, self.input_shape = d.num_classes, d.train_images.shape[1:]
    self.mean, self.std = d.mean, d.std

  def start(self, model, train_on_batch, log_compile: Callable[[str, float], None],
            stack: RunStack) -> None:
    c = self.config
    self.train_data = put_train(self.dataset, self.mesh)
    self._make = functools.partial(
        make_resident_train_fn, train_on_batch, batch_size=c.train.batch_size,
        crop_padding=c.data.crop_padding, flip=c.data.flip)
    self._compiled: dict[int, Any] = {}
    self._log_compile, self._stack = log_compile, stack
    self.evaluate = TestEvaluation(self.dataset, model, c, self.mesh, stack)

  def train(self, state: TrainState, k: int):
    """k steps: one compiled call, or on the CPU k calls of one step (``conv.loops_are_slow``:
    a compiled loop would run every convolution's backward on XLA's slow path)."""
    if not conv.loops_are_slow(self.mesh.devices.flat[0].platform):
      return self._compiled_steps(k, state)(state, self.train_data, *self._args)
    merged = None
    for _ in range(k):
      state, m = self._compiled_steps(1, state)(state, self.train_data, *self._args)
      merged = m if merged is None else merged.merge(m)
    return state, merged

  @property
  def _args(self) -> tuple:
    return self._stack.seed_arg, self._stack.index_arg

  def _compiled_steps(self, k: int, state: TrainState):
    if k not in self._compiled:
      t0 = time.perf_counter()
      fn = self._stack.vmap(self._make(num_steps=k), (0, None, 0, 0))
      jitted = jax.jit(fn, out_shardings=(replicated(self.mesh),) * 2, donate_argnums=0)
      self._compiled[k] = jitted.lower(state, self.train_data, *self._args).compile()
      self._log_compile(f"train_{k}_steps", time.perf_counter() - t0)
    return self._compiled[k]


class StreamedFeed:
  """ImageNet from the host pipeline: each process feeds its share of every global batch."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    size = config.data.image_size
    self.num_classes, self.input_shape = imagenet.NUM_CLASSES, (size, size, 3)
    self.mean, self.std = imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD
    say(f"data: TFDS imagenet2012 (data_dir={config.data.dir or 'default'})")

  def _split(self, split: str, train: bool, batch_size: int):
    c = self.config.data
    return imagenet.make_split(split, batch_size=batch_size, train=train,
                                    image_size=c.image_size, data_dir=c.dir or None,
                                    seed=self.config.seed)

  def _global(self, local: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(sharded(self.mesh), local)

  def start(self, model, train_on_batch, log_compile, stack: RunStack) -> None:
    if stack.stacked:  # one host pipeline feeds one run: stacked runs would share its batches
      raise ValueError(f"a stack of runs ({', '.join(stack.names)}) trains on resident data only "
                       "(cifar10, digits); train ImageNet runs one at a time")
    self.config = stack.runs[0].config  # the run's own seed: its batches and gates
    rep = replicated(self.mesh)
    self._batches = self._split("train", True, self.config.train.batch_size)
    gate_key = run_keys(self.config.seed).gates
    self._step = jax.jit(lambda state, x, y: train_on_batch(state, x, y, gate_key),
                         out_shardings=(rep, rep), donate_argnums=0)
    validation = imagenet.StreamedValidation(image_size=self.config.data.image_size,
                                             data_dir=self.config.data.dir or None)
    self.evaluate = TestEvaluation(validation, model, self.config, self.mesh, stack)

  def train(self, state: TrainState, k: int):
    merged = None
    for _ in range(k):
      images, labels = next(self._batches)
      state, m = self._step(state, self._global(images), self._global(labels))
      merged = m if merged is None else merged.merge(m)
    return state, merged


def make_feed(config, mesh, dataset: data_lib.ImageDataset | None = None):
  """The input feed for ``config.data.name``: resident (digits, cifar10; ``dataset``, when
  given, is that data loaded already) or streamed (ImageNet)."""
  if config.data.name == "imagenet2012":
    return StreamedFeed(config, mesh)
  return ResidentFeed(config, mesh, dataset)
