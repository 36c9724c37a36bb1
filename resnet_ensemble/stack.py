"""Several seeds trained as one program: the train step vmapped over a stack of runs.

Why: at the paper's batch of 128 a ResNet-110 step is launch-bound on a GPU (a third of the
device idle, ~1,900 small kernels per step; BUILD_NOTES, session 5), so K runs vmapped into one
step launch about the same kernels, each K times larger: the seeds the paper's error bars need
for less than K times the time of one. Vmapping a convolution over its weights makes it one
grouped convolution.

Each run keeps everything a run trained alone has: its seed (initialisation, batch order,
augmentation, gates), its workdir with checkpoints, metrics and final metrics. The numbers are
those of training it alone (tests/test_stack.py), so any run of a stack can be resumed,
analysed or published alone. One seed is not a stack: nothing is vmapped.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble.sharding import on_host, put_tree, replicated


def run_workdirs(seeds: Sequence[int], workdir: str) -> list[str]:
  """The workdir of each run: ``workdir`` itself for a single run, else ``workdir/seed{s}``."""
  if len(seeds) == 1:
    return [workdir]
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds {tuple(seeds)} repeat a seed: each run needs its own")
  return [os.path.join(workdir, f"seed{s}") for s in seeds]


def check_mode(seeds: Sequence[int], mode: str, workdir: str) -> None:
  """A stack only trains: the analyses take one trained run's workdir."""
  if len(seeds) > 1 and mode != "train":
    raise ValueError(f"--config.seeds={tuple(seeds)} trains a stack of runs (workdir/seed{{s}}); "
                     f"run --mode={mode} on one run: --workdir={run_workdirs(seeds, workdir)[0]} "
                     "without --config.seeds")


class RunStack:
  """K runs, one per seed, as one program (K = 1: the plain program, no vmap)."""

  def __init__(self, seeds: Sequence[int], mesh):
    self.seeds = tuple(int(s) for s in seeds)
    if not self.seeds:
      raise ValueError("a run stack needs at least one seed")
    if any(s < 0 for s in self.seeds):
      raise ValueError(f"seeds must be non-negative, got {self.seeds}")
    self.stacked = len(self.seeds) > 1
    self.mesh = mesh

  def __len__(self) -> int:
    return len(self.seeds)

  @functools.cached_property
  def seed_arg(self) -> jax.Array:
    """The seed(s) as a program argument: (K,) for a stack, a scalar otherwise."""
    return jnp.asarray(self.seeds if self.stacked else self.seeds[0], jnp.uint32)

  def vmap(self, fn: Callable, in_axes) -> Callable:
    """``fn`` over the runs (``in_axes`` as jax.vmap's: 0 for per-run arguments)."""
    return jax.vmap(fn, in_axes=in_axes) if self.stacked else fn

  def init(self, init: Callable[[jax.Array], Any]) -> Any:
    """``init(seed)`` of every run, as one program on the host (``sharding.on_host``: one
    compilation for all seeds), replicated over the mesh; stacked for a stack."""
    seeds = self.seed_arg
    return put_tree(on_host(lambda: self.vmap(init, 0)(seeds)), replicated(self.mesh))

  def join(self, trees: Sequence[Any]) -> Any:
    """Per-run pytrees -> one stacked pytree, replicated over the mesh."""
    if not self.stacked:
      return trees[0]
    return put_tree(jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees),
                    replicated(self.mesh))

  def split(self, tree: Any) -> list[Any]:
    """One stacked pytree -> per-run pytrees (each replicated, as a single run's)."""
    return self._split(tree) if self.stacked else [tree]

  @functools.cached_property
  def _split(self) -> Callable:  # one compiled program, reused at every checkpoint
    return jax.jit(lambda t: [jax.tree.map(lambda a: a[i], t) for i in range(len(self))],
                   out_shardings=replicated(self.mesh))

  def split_host(self, tree: Any) -> list[Any]:
    """A small stacked pytree (metrics) fetched to the host, one per run."""
    host = jax.device_get(tree)
    if not self.stacked:
      return [host]
    return [jax.tree.map(lambda a: a[i], host) for i in range(len(self))]

  def per_run(self, values: Mapping[str, Any]) -> list[dict[str, float]]:
    """``{name: value}`` (scalars, or (K,) for a stack) -> one ``{name: float}`` per run."""
    return [{k: float(v) for k, v in run.items()} for run in self.split_host(dict(values))]
