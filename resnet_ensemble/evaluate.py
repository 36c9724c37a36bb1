"""Evaluation, the one every analysis and the trainer use: the loss, the test error of a
(gated) network over padded test batches, and the batch run over grouped weight copies.

Kept apart from training so that the analyses (lesion, path gradients, the JPEG probe) need
nothing of the trainer: a trained network in, named numbers out.
"""

from __future__ import annotations

from typing import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from resnet_ensemble import blocks
from resnet_ensemble.augment import normalize


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy against (optionally label-smoothed) one-hot targets."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return optax.softmax_cross_entropy(logits, targets)


SUMS = ("loss_sum", "correct", "count")  # what an evaluator adds over its images


def means(loss_sum, correct, count) -> dict:
  """``{loss, accuracy, error, count}`` from sums over ``count`` images: every evaluator's and
  every pass's numbers come from this one arithmetic, so a test set evaluated as one stack of
  batches or as a stream of them gives its numbers the same way."""
  accuracy = correct / count
  return {"loss": loss_sum / count, "accuracy": accuracy, "error": 1.0 - accuracy,
          "count": count}


def with_means(loss_sum, correct, count) -> dict:
  """The sums and their ``means``: what an evaluator returns."""
  return {"loss_sum": loss_sum, "correct": correct, **means(loss_sum, correct, count)}


def make_eval_fn(model: nn.Module, mean, std, conv_groups: int = 1) -> Callable:
  """``eval_fn(variables, images, labels, mask, gates=None) -> {loss, accuracy, error, count,
  loss_sum, correct}`` over a stack of padded batches (leading axis); the sums let ``total``
  add stacks up. Pure, so it can be vmapped over gates. ``conv_groups`` (``eval.conv_groups``):
  each batch as that many slices over weight copies, grouped convolutions, the same numbers
  (``grouped_apply``)."""
  apply = grouped_apply(model, conv_groups, train=False)

  def eval_fn(variables, images, labels, mask, gates=None):
    def body(totals, batch):
      x, y, m = batch
      logits, _ = apply(variables, normalize(x, mean, std), gates, False)
      loss = cross_entropy(logits, y)
      correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
      return (totals[0] + jnp.sum(loss * m), totals[1] + jnp.sum(correct * m)), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (images, labels, mask))
    return with_means(loss_sum, correct, jnp.sum(mask))

  return eval_fn


def total(outs: Iterable[dict]) -> dict:
  """An evaluator's numbers over a whole pass (``eval_batches``) from each item's: the sums
  added on the device (nothing is read back until the caller reads), then ``with_means``.
  A pass of one stack gives that stack's numbers exactly."""
  sums = None
  for out in outs:
    part = tuple(out[k] for k in SUMS)
    sums = part if sums is None else tuple(a + b for a, b in zip(sums, part))
  if sums is None:
    raise ValueError("the test pass held no batches (check eval.max_images and the data)")
  return with_means(*sums)


GROUP_AXIS = "conv_groups"


def grouped_apply(model: nn.Module, groups: int, train: bool) -> Callable:
  """``apply(variables, x, gates, skip_compute) -> (logits, batch_stats updates)`` (no
  updates outside training); the batch run as ``groups`` slices over ``groups`` copies of
  the weights.

  vmap over the copies turns every convolution into one grouped convolution with
  ``groups`` x the channels: the same arithmetic in another kernel, which keeps a 16-channel
  layer's GEMM tiles fuller (``train.conv_groups``, ``eval.conv_groups``). In training,
  BatchNorm statistics are taken over the whole batch (a mean over the slices' axis) and the
  copies' gradients sum to the weights' gradient: the function is that of ``groups=1``.
  Slice g holds examples g, g + G, ..., so a batch split over devices stays split the same
  way."""
  mutable = ["batch_stats"] if train else []
  if groups == 1:
    return lambda variables, x, gates, skip: model.apply(
        variables, x, gates=gates, train=train, skip_compute=skip, mutable=mutable)
  grouped = model.clone(norm_axis_name=GROUP_AXIS)

  def split(a: jax.Array, axis: int = 0) -> jax.Array:  # (.., B, ..) -> (G, .., B/G, ..)
    shape = a.shape[:axis] + (a.shape[axis] // groups, groups) + a.shape[axis + 1:]
    return jnp.moveaxis(a.reshape(shape), axis + 1, 0)

  def apply(variables, x, gates, skip):
    if x.shape[0] % groups:
      raise ValueError(f"{'train' if train else 'eval'}.conv_groups={groups} must divide the "
                       f"batch size {x.shape[0]}")
    copies = jax.tree.map(lambda v: jnp.broadcast_to(v, (groups,) + v.shape), variables)
    per_example = gates is not None and gates.ndim == 2  # (n_blocks, batch)
    # Slices with per-example gates disagree on a block; each slice's cond would also judge a
    # block by its own slice, not by the batch.
    skip = blocks.should_skip(skip, sampled=True, vmapped=per_example)
    one = lambda v, xs, g: grouped.apply(  # noqa: E731
        v, xs, gates=g, train=train, skip_compute=skip, mutable=mutable)
    logits, updates = jax.vmap(one, in_axes=(0, 0, 0 if per_example else None),
                               axis_name=GROUP_AXIS)(
        copies, split(x), split(gates, 1) if per_example else gates)
    # (G, B/G, classes) -> (B, classes) in the batch's order; every copy's statistics agree
    logits = jnp.moveaxis(logits, 0, 1).reshape(x.shape[0], -1)
    return logits, jax.tree.map(lambda u: u[0], updates)

  return apply
