"""Lesion studies (E1–E4): many damaged networks evaluated by one compiled program.

A *variant* of the trained network is a block order (a permutation of the stacked same-shape
blocks, E4) plus a gate vector over positions (zeros delete blocks, E1–E3). The evaluator
``vmap``s the test-set evaluation over a chunk of variants, with the chunk axis sharded over
the mesh and the test set resident on every device; every chunk has the same shape, so a
whole study compiles once.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import numpy as np

from resnet_ensemble.layout import BlockLayout
from resnet_ensemble.surgery import reorder_stacked
from resnet_ensemble.progress import Progress
from resnet_ensemble.sharding import put, put_tree, replicated, sharded


# ---------------------------------------------------------------- variants (host side, numpy)

def single_deletion_gates(layout: BlockLayout) -> np.ndarray:
  """E1: row i deletes block i only."""
  return 1.0 - np.eye(layout.n_blocks, dtype=np.float32)


def eligible_blocks(layout: BlockLayout, exclude_downsampling: bool) -> np.ndarray:
  blocks = np.arange(layout.n_blocks)
  if exclude_downsampling:
    blocks = np.setdiff1d(blocks, layout.downsampling)
  return blocks


def random_deletion_gates(rng: np.random.Generator, layout: BlockLayout, k: int, draws: int,
                          exclude_downsampling: bool = False) -> np.ndarray:
  """E3: ``draws`` gate vectors, each deleting k distinct blocks chosen uniformly."""
  eligible = eligible_blocks(layout, exclude_downsampling)
  if not 0 <= k <= len(eligible):
    raise ValueError(f"cannot delete k={k} blocks: the network has {len(eligible)} eligible "
                     f"blocks ({'downsampling excluded' if exclude_downsampling else 'all blocks'})")
  gates = np.ones((draws, layout.n_blocks), np.float32)
  for row in gates:
    row[rng.choice(eligible, size=k, replace=False)] = 0.0
  return gates


def random_swap_orders(rng: np.random.Generator, layout: BlockLayout, k: int,
                       draws: int) -> np.ndarray:
  """E4: ``draws`` block orders, each made by k random swaps of two same-shape blocks.

  A swap picks a block uniformly among the stacked (non-downsampling) blocks, then a partner
  uniformly among the other stacked blocks of its stage."""
  groups = [list(layout.stacked_range(s)) for s in range(layout.num_stages)
            if len(layout.stacked_range(s)) >= 2]
  if k and not groups:
    raise ValueError("no stage has two same-shape blocks to swap")
  movable = [i for g in groups for i in g]
  stage_of = {i: g for g in groups for i in g}
  orders = np.tile(np.arange(layout.n_blocks), (draws, 1))
  for order in orders:
    for _ in range(k):
      i = rng.choice(movable)
      j = rng.choice([b for b in stage_of[i] if b != i])
      order[i], order[j] = order[j], order[i]
  return orders


def kendall_tau(order: Sequence[int]) -> float:
  """Kendall's tau between ``order`` and the identity order (exact: pairs counted, no ties)."""
  order = np.asarray(order)
  n = len(order)
  if n < 2:
    return 1.0
  discordant = int(np.sum(np.triu(order[:, None] > order[None, :], k=1)))
  pairs = n * (n - 1) // 2
  return (pairs - 2 * discordant) / pairs


# ------------------------------------------------------------------- the compiled evaluator

def make_variant_evaluator(eval_fn: Callable, layout: BlockLayout, mesh) -> Callable:
  """``fn(variables, images, labels, mask, gates (G, n), orders (G, n)) -> {error, loss}`` (G,).

  ``eval_fn`` is ``train.make_eval_fn(...)``; G must be a multiple of the device count."""

  def one(variables, images, labels, mask, gates, order):
    out = eval_fn(reorder_stacked(variables, layout, order), images, labels, mask, gates)
    return {"error": out["error"], "loss": out["loss"]}

  batched = jax.vmap(one, in_axes=(None, None, None, None, 0, 0))
  rep, split = replicated(mesh), sharded(mesh)
  # Outputs replicated: a few floats per variant, readable on every process.
  return jax.jit(batched, in_shardings=(rep, rep, rep, rep, split, split), out_shardings=rep)


class LesionEngine:
  """Evaluates any number of variants in fixed-size chunks (one compilation)."""

  def __init__(self, eval_fn: Callable, layout: BlockLayout, variables, test_images,
               test_labels, test_mask, mesh, chunk: int, base_gates: np.ndarray | None = None):
    """``base_gates``: the trained network's test-time gates (stochastic depth or effective
    paths scale residuals by their expected gate); every variant's gates multiply them."""
    if chunk % mesh.size:
      chunk = mesh.size * math.ceil(chunk / mesh.size)
    self.layout, self.chunk, self.mesh = layout, chunk, mesh
    self.base_gates = (np.ones((layout.n_blocks,), np.float32) if base_gates is None
                       else np.asarray(base_gates, np.float32))
    self.fn = make_variant_evaluator(eval_fn, layout, mesh)
    self.split = sharded(mesh)
    self.args = put_tree((variables, test_images, test_labels, test_mask), replicated(mesh))

  def evaluate(self, gates: np.ndarray | None = None, orders: np.ndarray | None = None,
               desc: str = "lesions") -> np.ndarray:
    """Test error of every variant (rows of ``gates`` / ``orders``; missing = intact)."""
    n = self.layout.n_blocks
    count = len(gates) if gates is not None else len(orders)
    gates = np.ones((count, n), np.float32) if gates is None else np.asarray(gates, np.float32)
    orders = np.tile(np.arange(n), (count, 1)) if orders is None else np.asarray(orders)
    if gates.shape != (count, n) or orders.shape != (count, n):
      raise ValueError(f"gates and orders must both have shape ({count}, {n}); got "
                       f"{gates.shape} and {orders.shape}")
    errors = np.empty((count,), np.float64)
    progress = Progress(count, desc, unit="variants", every_s=10.0)
    for start in range(0, count, self.chunk):
      stop = min(start + self.chunk, count)
      pad = self.chunk - (stop - start)
      g = np.concatenate([gates[start:stop], np.ones((pad, n), np.float32)])
      o = np.concatenate([orders[start:stop], np.tile(np.arange(n), (pad, 1))]).astype(np.int32)
      out = self.fn(*self.args, put(g * self.base_gates, self.split), put(o, self.split))
      errors[start:stop] = np.asarray(out["error"])[:stop - start]
      progress.update(stop)
    return errors


# ------------------------------------------------------------------------------ the study

def _stats(errors: np.ndarray) -> dict:
  return {"mean": errors.mean(1).tolist(), "std": errors.std(1).tolist(),
          "min": errors.min(1).tolist(), "max": errors.max(1).tolist(),
          "error": errors.tolist()}


def run_study(config, workdir: str) -> dict:
  """E1–E4 on the newest checkpoint of ``workdir``; writes and returns ``lesion.json``."""
  from resnet_ensemble import results, train, trained
  from resnet_ensemble.sharding import make_mesh
  t = trained.load_trained(config, workdir)
  layout, lc = t.layout, config.lesion
  n = layout.n_blocks
  if lc.max_k > n:
    raise ValueError(f"lesion.max_k={lc.max_k} is larger than the number of blocks ({n})")
  mesh = make_mesh()
  eval_fn = train.make_eval_fn(t.model, t.dataset.mean, t.dataset.std)
  from resnet_ensemble import gates as gates_lib
  engine = LesionEngine(eval_fn, layout, t.variables,
                        *trained.padded_test_batches(t.dataset, config.eval.batch_size),
                        mesh=mesh, chunk=lc.chunk,
                        base_gates=gates_lib.eval_gates(config.gates, layout))
  rng = np.random.default_rng(config.seed)
  baseline = float(engine.evaluate(np.ones((1, n), np.float32), desc="baseline")[0])
  single = engine.evaluate(single_deletion_gates(layout), desc="E1 delete one block")
  out = {
      "config": results.config_dict(config), "checkpoint_step": t.step,
      "data_source": t.dataset.source, "seed": config.seed, "layout": layout.describe(),
      "model_kind": "plain" if config.model.name == "plain" else "resnet",
      "baseline": {"error": baseline, "accuracy": 1.0 - baseline},
      "single": {"error": single.tolist()},
  }
  variants = [("random", False)]
  if lc.exclude_downsampling_variant and layout.downsampling:
    variants.append(("random_no_downsampling", True))
  for name, exclude in variants:
    ks = list(range(min(lc.max_k, len(eligible_blocks(layout, exclude))) + 1))
    gates = np.concatenate([random_deletion_gates(rng, layout, k, lc.draws, exclude) for k in ks])
    errors = engine.evaluate(gates, desc=f"E3 delete k blocks ({name})").reshape(len(ks), lc.draws)
    out[name] = {"k": ks, "draws": lc.draws, "exclude_downsampling": exclude, **_stats(errors)}
  if lc.reorder_max_swaps:
    ks = list(range(1, lc.reorder_max_swaps + 1))
    orders = np.concatenate([random_swap_orders(rng, layout, k, lc.reorder_draws) for k in ks])
    errors = engine.evaluate(orders=orders, desc="E4 reorder blocks").reshape(len(ks), -1)
    taus = np.asarray([kendall_tau(o) for o in orders]).reshape(len(ks), -1)
    out["reorder"] = {"k": ks, "draws": lc.reorder_draws, "tau": taus.tolist(),
                      "error": errors.tolist()}
  results.write_json(workdir, "lesion.json", out)
  return out
