"""Block reordering as a permutation of stacked parameters (no new model, no recompilation)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from resnet_ensemble.layout import BlockLayout, check_order, stacked_name


def reorder_stacked(variables: Mapping[str, Any], layout: BlockLayout, order) -> dict[str, Any]:
  """Variables whose network runs block ``order[p]`` at position ``p``; ``order`` may be traced
  (inside jit/vmap), so it is not validated here: see ``permute_blocks``."""
  out = {}
  for collection, tree in variables.items():
    tree = dict(tree)
    for s in range(layout.num_stages):
      r = layout.stacked_range(s)
      name = stacked_name(s)
      if name in tree and len(r):
        take = jnp.asarray(order)[r.start:r.stop] - r.start
        tree[name] = jax.tree.map(lambda a, take=take: jnp.take(a, take, axis=0), tree[name])
    out[collection] = tree
  return out


def permute_blocks(variables: Mapping[str, Any], layout: BlockLayout,
                   order: Sequence[int]) -> dict[str, Any]:
  """Returns variables whose network runs block ``order[p]`` at position ``p``.

  Only the stacked (same-shape) blocks of a stage can move (``layout.check_order`` says why
  an order is refused); params and batch statistics move together."""
  return reorder_stacked(variables, layout, check_order(layout, order))
