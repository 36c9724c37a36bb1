"""The damaged transformers each experiment evaluates (host side, numpy): gate vectors over the
2L branches (attn_0, mlp_0, attn_1, ...) and index arrays over the stacked layers.

E1 deletes each branch alone and each whole layer; E3 deletes k random branches (of all, or
keeping the first and last layer's); E4 reorders the layers by each adjacent swap and by k
random swaps (Kendall's tau against the trained order, ``lesion.kendall_tau``), and runs the
"painters" interventions an index array expresses: a middle layer run twice, the middle span
reversed or shuffled, the middle span skipped.

The painters variants run different numbers of layers (a repeat runs L + 1). So that they are
one compiled program, every one is padded to L + 1 positions: the spare position runs layer 0
with both gates 0, which adds exactly nothing to the stream (``x + 0 * f(x)``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from resnet_ensemble import lesion


def single_branch_gates(n_layers: int) -> np.ndarray:
  """E1: row b deletes branch b only (2L rows)."""
  return 1.0 - np.eye(2 * n_layers, dtype=np.float32)


def single_layer_gates(n_layers: int) -> np.ndarray:
  """E1 per layer: row l deletes layer l's attention and MLP (L rows)."""
  return np.repeat(1.0 - np.eye(n_layers, dtype=np.float32), 2, axis=1)


def eligible_branches(n_layers: int, keep_ends: bool) -> np.ndarray:
  """The branches E3 may delete: all 2L, or all but the first and last layer's."""
  branches = np.arange(2 * n_layers)
  if keep_ends:
    branches = branches[2:-2]
  return branches


def random_deletion_gates(rng: np.random.Generator, n_layers: int, k: int, draws: int,
                          keep_ends: bool = False) -> np.ndarray:
  """E3: ``draws`` gate vectors (2L,), each deleting k distinct eligible branches."""
  return lesion.random_deletions(rng, 2 * n_layers, eligible_branches(n_layers, keep_ends), k,
                                 draws, "branches",
                                 "first and last layer kept" if keep_ends else "all")


def adjacent_swap_orders(n_layers: int) -> np.ndarray:
  """E4: row i runs layers i and i + 1 swapped (L - 1 rows)."""
  orders = np.tile(np.arange(n_layers), (max(n_layers - 1, 0), 1))
  for i, row in enumerate(orders):
    row[[i, i + 1]] = row[[i + 1, i]]
  return orders.astype(np.int32)


def random_swap_orders(rng: np.random.Generator, n_layers: int, k: int,
                       draws: int) -> np.ndarray:
  """E4: ``draws`` orders, each made by k swaps of a uniformly random layer with a uniformly
  random other one (every layer has the same shape: one stage, as for the ResNets)."""
  if k and n_layers < 2:
    raise ValueError("reordering needs at least two layers")
  orders = np.tile(np.arange(n_layers), (draws, 1))
  for order in orders:
    for _ in range(k):
      i = rng.choice(n_layers)
      j = rng.choice([b for b in range(n_layers) if b != i])
      order[i], order[j] = order[j], order[i]
  return orders.astype(np.int32)


def kendall_taus(orders: np.ndarray) -> np.ndarray:
  return np.asarray([lesion.kendall_tau(o) for o in orders], np.float64)


def middle_span(n_layers: int) -> tuple[int, int]:
  """[lo, hi): the middle layers the painters interventions touch, the first and last quarter
  (at least the first and last layer) left alone."""
  lo = max(1, n_layers // 4)
  hi = min(n_layers - 1, n_layers - n_layers // 4)
  if hi <= lo:
    raise ValueError(f"a model of {n_layers} layers has no middle span (3 layers at least)")
  return lo, hi


@dataclasses.dataclass(frozen=True)
class Painters:
  """The painters variants, padded to L + 1 positions: ``orders`` (P, L + 1), ``gates``
  (P, 2L + 2), ``names`` and ``runs`` (the layers each actually runs, in order)."""

  names: list[str]
  orders: np.ndarray
  gates: np.ndarray
  runs: list[list[int]]


def painters(rng: np.random.Generator, n_layers: int, shuffles: int) -> Painters:
  """Repeat the middle layer, reverse the middle span, ``shuffles`` random shuffles of it, skip
  it; the intact order first (the reference every other row is measured against)."""
  lo, hi = middle_span(n_layers)
  identity = list(range(n_layers))
  middle = (lo + hi - 1) // 2
  rows = [("intact", identity, identity),
          (f"repeat layer {middle}", identity[:middle + 1] + identity[middle:], None),
          (f"reverse layers {lo}-{hi - 1}", identity[:lo] + identity[lo:hi][::-1] + identity[hi:],
           None)]
  for s in range(shuffles):
    span = list(rng.permutation(identity[lo:hi]))
    rows.append((f"shuffle layers {lo}-{hi - 1} #{s + 1}",
                 identity[:lo] + [int(i) for i in span] + identity[hi:], None))
  rows.append((f"skip layers {lo}-{hi - 1}", identity[:lo] + identity[hi:], None))
  names, orders, gates, runs = [], [], [], []
  for name, run, _ in rows:
    pad = n_layers + 1 - len(run)
    orders.append(run + [0] * pad)
    gates.append([1.0] * (2 * len(run)) + [0.0] * (2 * pad))
    names.append(name)
    runs.append(run)
  return Painters(names, np.asarray(orders, np.int32), np.asarray(gates, np.float32), runs)
