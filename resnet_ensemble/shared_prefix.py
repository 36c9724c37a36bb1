"""Lesion variants evaluated from the intact network's shared prefix.

A variant (gates, block order) computes exactly what the intact network computes up to its
*first changed position* p: the first block whose gate differs from the trained network's
test-time gate or whose block is not the trained one there. So each batch of test images runs the intact network once,
keeping the input of every block, and each variant then runs only blocks p..n-1, starting
from the kept input of block p. Deleting each block once (E1) costs about half of n full
passes; a variant that damages only the last of a CIFAR ResNet's three stages (equal FLOPs
each) costs about a third of one.

Variants run one after another (``lax.map``), each over the whole batch of images: p bounds a
loop over the stage's stacked blocks, so a late start skips work instead of masking it (under
``vmap`` every variant would pay for the earliest start). A reordered variant gathers the
weights of the block it places at each position inside that loop, so E4 needs no copy of the
weights per variant. The kept inputs cost memory: ``kept_bytes_per_image`` says how much, and
``batch_for_budget`` picks the batch size that fits a budget.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble import models
from resnet_ensemble.augment import normalize
from resnet_ensemble.evaluate import cross_entropy, with_means
from resnet_ensemble.layout import down_name, stacked_name


def first_changed(gates, orders, base_gates):
  """Per variant, the first position whose gate differs from the trained network's test-time
  gate or whose block is not the trained one there; ``n_blocks`` for the intact network
  (nothing to recompute). numpy or jax arrays: (G, n), (G, n), (n,) -> (G,) int32."""
  xp = jnp if isinstance(gates, jax.Array) else np
  n = orders.shape[1]
  changed = (gates != base_gates) | (orders != xp.arange(n))
  return xp.where(changed.any(1), changed.argmax(1), n).astype(xp.int32)


def kept_bytes_per_image(model, input_shape) -> int:
  """Bytes of block inputs one test image keeps (every block's input, in the stream dtype)."""
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  ones = jnp.ones((model.layout.n_blocks,), jnp.float32)
  kept = jax.eval_shape(lambda v, x: _intact_pass(model, v, x, ones)[0], variables, x)
  return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(kept)))


def batch_for_budget(images_per_batch: int, bytes_per_image: int, budget_bytes: int,
                     multiple: int = 1) -> int:
  """The largest batch of at most ``images_per_batch`` images whose kept block inputs fit
  ``budget_bytes`` (a multiple of ``multiple``, the device count; at least ``multiple``)."""
  fits = max(budget_bytes // max(bytes_per_image, 1), 1)
  batch = min(images_per_batch, fits)
  return max(multiple, batch // multiple * multiple)


# ------------------------------------------------------------------------ the network in parts

def _stages(model):
  """Per stage: (positions, downsampling block or None, stacked block, enter_stage or None),
  the blocks as inference-mode modules (BatchNorm with running statistics)."""
  for s, down, stacked, enter in models.inference_stages(model):
    yield (model.layout.stage_range(s), None if down is None else down(), stacked(), enter)


def _ends(model, variables):
  """(embed, head): the stem and the classifier as pure functions of an array."""
  unrolled = models.unroll(model, variables)
  return unrolled.embed, unrolled.head


def _intact_pass(model, variables, x: jax.Array, base_gates: jax.Array):
  """The trained network with its test-time gates, keeping each block's input: returns
  (kept: per stage {"down": input of the downsampling block, "stacked": (k, B, ...) inputs
  of the stacked blocks}, logits)."""
  embed, head = _ends(model, variables)
  x = embed(x)
  kept = []
  for s, (positions, down, stacked, enter) in enumerate(_stages(model)):
    if enter is not None:
      x = enter(x)
    stage = {}
    first = positions.start
    if down is not None:
      stage["down"] = x
      x = down.apply(models.variables_of(variables, down_name(s)), x, base_gates[first])
      first += 1
    if first < positions.stop:
      tree = models.variables_of(variables, stacked_name(s))

      def body(x, step, stacked=stacked):
        params, gate = step
        return stacked.apply(params, x, gate), x

      x, stage["stacked"] = jax.lax.scan(body, x, (tree, base_gates[first:positions.stop]))
    kept.append(stage)
  return kept, head(x)


def _variant_logits(model, variables, kept, intact_logits, gates: jax.Array,
                    order: jax.Array, start: jax.Array) -> jax.Array:
  """Logits of one variant that equals the intact network before position ``start``: from
  the kept input of block ``start``, blocks start..n-1 with the variant's gates and order."""
  _, head = _ends(model, variables)
  x = None  # the variant's own activation, once it has diverged
  for s, (positions, down, stacked, enter) in enumerate(_stages(model)):
    stage, first = kept[s], positions.start
    own = None if x is None else (enter(x) if enter is not None else x)
    if down is not None:
      x_in = stage["down"] if own is None else jnp.where(start < first, own, stage["down"])
      if "stacked" not in stage:  # a stage of one block: always run it
        x = down.apply(models.variables_of(variables, down_name(s)), x_in, gates[first])
        continue
      ran = lambda x_in=x_in, s=s, first=first, down=down: down.apply(  # noqa: E731
          models.variables_of(variables, down_name(s)), x_in, gates[first])
      index = jnp.clip(start - first - 1, 0, len(positions) - 2)
      x = jax.lax.cond(start <= first, ran, lambda stage=stage, index=index: stage["stacked"][index])
      first += 1
    else:
      index = jnp.clip(start - first, 0, len(positions) - 1)
      x = stage["stacked"][index] if own is None else jnp.where(
          start < first, own, stage["stacked"][index])
    tree = models.variables_of(variables, stacked_name(s))

    def body(j, x, stacked=stacked, tree=tree, first=first):
      block = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, order[j] - first, 0, False),
                           tree)
      return stacked.apply(block, x, gates[j])

    x = jax.lax.fori_loop(jnp.maximum(start, first), positions.stop, body, x)
  return jnp.where(start < model.layout.n_blocks, head(x), intact_logits)


def make_prefix_evaluator(model, mean, std) -> Callable:
  """``fn(variables, images, labels, mask, base_gates (n,), gates (G, n), orders (G, n))
  -> {error, loss, accuracy, loss_sum, correct, count}`` (G,) over a stack of padded batches;
  the variants' gates are already multiplied by ``base_gates`` (the trained network's
  test-time gates, those of its shared prefix). The same numbers as ``evaluate.make_eval_fn``
  on each variant alone."""

  def fn(variables, images, labels, mask, base_gates, gates, orders):
    starts = first_changed(gates, orders, base_gates)

    def batch(totals, data):
      x, y, m = data
      kept, intact = _intact_pass(model, variables, normalize(x, mean, std), base_gates)

      def variant(v):
        logits = _variant_logits(model, variables, kept, intact, *v)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return jnp.stack([jnp.sum(cross_entropy(logits, y) * m), jnp.sum(correct * m)])

      return totals + jax.lax.map(variant, (gates, orders, starts)), None

    zero = jnp.zeros((gates.shape[0], 2), jnp.float32)
    sums, _ = jax.lax.scan(batch, zero, (images, labels, mask))
    count = jnp.full((gates.shape[0],), jnp.sum(mask))
    return with_means(sums[:, 0], sums[:, 1], count)

  return fn
