"""Block reordering as a permutation of stacked parameters (no new model, no recompilation)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from resnet_ensemble.layout import BlockLayout, check_order, stacked_name


def permute_blocks(variables: Mapping[str, Any], layout: BlockLayout,
                   order: Sequence[int]) -> dict[str, Any]:
  """Returns variables whose network runs block ``order[p]`` at position ``p``.

  Only the stacked (same-shape) blocks of a stage can move; params and batch statistics move
  together. ``order`` is validated by ``layout.check_order``.
  """
  order = check_order(layout, order)
  out = {}
  for collection, tree in variables.items():
    tree = dict(tree)
    for s in range(layout.num_stages):
      r = layout.stacked_range(s)
      name = stacked_name(s)
      if name in tree and len(r):
        take = np.asarray([order[p] - r.start for p in r])
        tree[name] = jax.tree.map(lambda a, take=take: a[take], tree[name])
    out[collection] = tree
  return out
