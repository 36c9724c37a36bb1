"""The block indexing the whole project shares.

A network is a list of stages; stage ``s`` holds ``stage_sizes[s]`` blocks. Blocks are numbered
globally ``0 .. n_blocks-1`` in forward order (the paper numbers them from 1, so its
"block 19 and 37" of ResNet-110 are our 18 and 36). Within a stage the first block may change
the tensor shape (stride or width): it is a *downsampling* block, held on its own. The other
blocks of the stage are identical in shape, so their parameters are stacked on a leading axis
and run with ``scan``; reordering them is a permutation of that axis.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Where each block lives: stage, stacked position, and whether it downsamples."""

  stage_sizes: tuple[int, ...]
  first_is_down: tuple[bool, ...]  # per stage: does its first block change the shape?

  def __post_init__(self):
    if len(self.stage_sizes) != len(self.first_is_down):
      raise ValueError("stage_sizes and first_is_down must have the same length")
    if any(s < 1 for s in self.stage_sizes):
      raise ValueError(f"every stage needs at least one block, got {self.stage_sizes}")

  @property
  def n_blocks(self) -> int:
    return sum(self.stage_sizes)

  @property
  def num_stages(self) -> int:
    return len(self.stage_sizes)

  def stage_range(self, stage: int) -> range:
    """Global indices of all blocks of ``stage``."""
    start = sum(self.stage_sizes[:stage])
    return range(start, start + self.stage_sizes[stage])

  def stacked_range(self, stage: int) -> range:
    """Global indices of the stacked (scanned, same-shape) blocks of ``stage``."""
    r = self.stage_range(stage)
    return r[1:] if self.first_is_down[stage] else r

  @property
  def downsampling(self) -> tuple[int, ...]:
    """Global indices of blocks whose shortcut is not the identity."""
    return tuple(self.stage_range(s).start for s in range(self.num_stages)
                 if self.first_is_down[s])

  def check_index(self, index: int) -> int:
    """Returns ``index`` or raises an IndexError naming the valid range."""
    if not 0 <= int(index) < self.n_blocks:
      raise IndexError(
          f"block index {index} is out of range: this network has {self.n_blocks} blocks "
          f"(indices 0..{self.n_blocks - 1})")
    return int(index)

  def stage_of(self, index: int) -> int:
    index = self.check_index(index)
    for s in range(self.num_stages):
      if index in self.stage_range(s):
        return s
    raise AssertionError("unreachable")

  def describe(self) -> dict:
    """A JSON-friendly summary, written next to every result."""
    return {
        "n_blocks": self.n_blocks,
        "stage_sizes": list(self.stage_sizes),
        "downsampling": list(self.downsampling),
        "stages": [list(self.stage_range(s)) for s in range(self.num_stages)],
    }


def stacked_name(stage: int) -> str:
  """Name of the parameter subtree holding a stage's stacked blocks."""
  return f"stage{stage}_blocks"


def down_name(stage: int) -> str:
  """Name of the parameter subtree of a stage's downsampling block."""
  return f"stage{stage}_down"


def check_order(layout: BlockLayout, order: Sequence[int]) -> tuple[int, ...]:
  """Validates a block order: a permutation that only moves stacked blocks within a stage."""
  order = tuple(int(i) for i in order)
  if sorted(order) != list(range(layout.n_blocks)):
    raise ValueError(f"block order must be a permutation of 0..{layout.n_blocks - 1}, got {order}")
  for s in range(layout.num_stages):
    stacked = layout.stacked_range(s)
    for pos in layout.stage_range(s):
      if pos not in stacked and order[pos] != pos:
        raise ValueError(f"block {pos} is a downsampling block and cannot be moved")
      if pos in stacked and order[pos] not in stacked:
        raise ValueError(
            f"position {pos} (stage {s}) would receive block {order[pos]}, which has another "
            f"shape; blocks can only be reordered within their stage's stacked blocks "
            f"{list(stacked)}")
  return order
