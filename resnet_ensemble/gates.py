"""Gate samplers: training variants that are the same program with different gates.

- ``effective`` (E8): every mini-batch keeps exactly k of the n blocks active (the paper's 23
  of 54), chosen uniformly from the step's key; downsampling blocks always active by default
  (they count towards k).
- ``stochastic_depth`` (E10, Huang et al. 2016): block i survives with probability
  p_i = 1 - (i + 1) / n * (1 - p_L), independently per mini-batch (or per example).

At test time every block is active with its residual scaled by its expected gate
(``test_scaling='expected'``), or unscaled (``'none'``).

``gates.skip_compute`` (default on): the train step does not compute a block whose sampled gate
is zero for the whole mini-batch, the same numbers faster where it pays (``blocks.should_skip``).

A stack of runs (resnet_ensemble/stack.py) may mix samplers: ``make_stack_sampler`` gives each
run the gates its own sampler draws alone, inside one vmapped step.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble.layout import BlockLayout


def check_shape(gates, n: int, batch: int, dtype, what: str,
                error: type[ValueError] = ValueError) -> jax.Array:
  """The gates a network is called with: all ones for None, else shape ``(n,)`` or
  ``(n, batch)``, checked at trace time with one line naming the shape expected (``what``:
  what the n gates are, e.g. "for this network of 9 blocks")."""
  if gates is None:
    return jnp.ones((n,), dtype)
  gates = jnp.asarray(gates)
  if gates.ndim not in (1, 2) or gates.shape[0] != n:
    raise error(f"gates must have shape ({n},) or ({n}, batch) {what}; got shape {gates.shape}")
  if gates.ndim == 2 and gates.shape[1] != batch:
    raise error(f"per-example gates have batch size {gates.shape[1]}, the input has {batch}")
  return gates

SAMPLERS = ("none", "effective", "stochastic_depth")


def _check(gc, layout: BlockLayout) -> None:
  if gc.sampler not in SAMPLERS:
    raise ValueError(f"unknown gate sampler {gc.sampler!r}; valid: {', '.join(SAMPLERS)}")
  if gc.test_scaling not in ("expected", "none"):
    raise ValueError(f"unknown gates.test_scaling {gc.test_scaling!r}; valid: expected, none")
  n = layout.n_blocks
  if gc.sampler == "effective":
    fixed = len(layout.downsampling) if gc.keep_downsampling else 0
    if not 1 <= gc.k <= n:
      raise ValueError(f"gates.k={gc.k} must be between 1 and the number of blocks ({n})")
    if gc.k < fixed:
      raise ValueError(f"gates.k={gc.k} is smaller than the {fixed} downsampling blocks kept "
                       "always active (set gates.keep_downsampling=False or raise k)")
  if gc.sampler == "stochastic_depth" and not 0.0 < gc.p_last <= 1.0:
    raise ValueError(f"gates.p_last={gc.p_last} must be in (0, 1]")


def survival_probabilities(layout: BlockLayout, p_last: float,
                           keep_downsampling: bool) -> np.ndarray:
  """Huang et al.'s linear decay: 1 - (i + 1) / n * (1 - p_last) for block i (0-based)."""
  n = layout.n_blocks
  p = 1.0 - (np.arange(1, n + 1) / n) * (1.0 - p_last)
  if keep_downsampling:
    p[list(layout.downsampling)] = 1.0
  return p.astype(np.float32)


def expected_gates(gc, layout: BlockLayout) -> np.ndarray | None:
  """E[gate_i] under the sampler (None for 'none')."""
  _check(gc, layout)
  if gc.sampler == "none":
    return None
  if gc.sampler == "stochastic_depth":
    return survival_probabilities(layout, gc.p_last, gc.keep_downsampling)
  n, fixed = layout.n_blocks, list(layout.downsampling) if gc.keep_downsampling else []
  p = np.full((n,), (gc.k - len(fixed)) / (n - len(fixed)), np.float32)
  p[fixed] = 1.0
  return p


def eval_gates(gc, layout: BlockLayout) -> np.ndarray | None:
  """The gates of the test-time network (None = all ones, unscaled)."""
  return expected_gates(gc, layout) if gc.test_scaling == "expected" else None


def make_sampler(gc, layout: BlockLayout,
                 batch_size: int) -> Callable[[jax.Array], jax.Array] | None:
  """``sample(key) -> gates`` of shape (n,) or (n, batch) for the train step, or None."""
  _check(gc, layout)
  n = layout.n_blocks
  if gc.sampler == "none":
    return None
  if gc.sampler == "stochastic_depth":
    p = jnp.asarray(survival_probabilities(layout, gc.p_last, gc.keep_downsampling))
    shape = (n, batch_size) if gc.per_example else (n,)
    return lambda key: jax.random.bernoulli(
        key, p.reshape((n,) + (1,) * (len(shape) - 1)), shape).astype(jnp.float32)
  fixed = np.asarray(layout.downsampling if gc.keep_downsampling else (), np.int32)
  free = np.setdiff1d(np.arange(n), fixed).astype(np.int32)
  draw = gc.k - len(fixed)

  def sample(key):
    chosen = jax.random.permutation(key, jnp.asarray(free))[:draw]
    active = jnp.concatenate([jnp.asarray(fixed), chosen])
    return jnp.zeros((n,), jnp.float32).at[active].set(1.0)

  return sample


def make_stack_sampler(gcs: Sequence, layout: BlockLayout,
                       batch_size: int) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
  """``sample(key, run) -> gates`` for the runs of a stack (``gcs``: each run's gates config;
  ``run``: its index, traced under the stack's vmap), or None when no run samples gates.

  Run r's gates are ``make_sampler(gcs[r])(key)``: each distinct sampler is one branch of a
  ``lax.switch`` on the run, which under vmap computes every branch and selects, so a run
  draws from its own key exactly what it draws alone. A run without a sampler gets ones (the
  multiply form of an ungated block: the same numbers). When runs differ in shape, per-batch
  gates (n,) are broadcast to per-example (n, batch): every example gets the batch's gate."""
  distinct: dict[str, int] = {}
  branch_of = [distinct.setdefault(_sampling(gc), len(distinct)) for gc in gcs]
  unique = {i: gc for gc, i in zip(gcs, branch_of)}
  samplers = [make_sampler(unique[i], layout, batch_size) for i in range(len(distinct))]
  if all(s is None for s in samplers):
    return None
  n = layout.n_blocks
  ones = lambda key: jnp.ones((n,), jnp.float32)  # noqa: E731
  branches = [ones if s is None else s for s in samplers]
  if len(branches) == 1:
    return lambda key, run: branches[0](key)
  if len({jax.eval_shape(b, jax.random.key(0)).shape for b in branches}) > 1:
    branches = [lambda key, b=b: jnp.broadcast_to(b(key).reshape(n, -1), (n, batch_size))
                for b in branches]
  table = np.asarray(branch_of, np.int32)
  return lambda key, run: jax.lax.switch(jnp.asarray(table)[run], branches, key)


def _sampling(gc) -> str:
  """What decides a run's training gates (its gates config less the test-time and speed
  fields): runs that agree share one sampler."""
  d = gc.to_dict() if hasattr(gc, "to_dict") else dict(gc)
  return json.dumps({k: v for k, v in d.items() if k not in ("test_scaling", "skip_compute")},
                    sort_keys=True)
