"""The lesion engine: many damaged networks (variants) evaluated by one compiled program.

A *variant* of the trained network is a block order (a permutation of the stacked same-shape
blocks, E4) plus a gate vector over positions (zeros delete blocks, E1–E3). The engine takes
the variants in fixed-size chunks and evaluates each chunk with one pass over the evaluation
source's test batches (``eval_batches``: one stack placed once for CIFAR-10, a stream of
batches for ImageNet), adding the sums up on the device (``evaluate.total``); every chunk has
the same shape, so a whole study compiles once per form.

How a chunk is evaluated is the *form* (``lesion.variant_weights``), a small strategy:
``WholeNetworkForm`` ``vmap``s the whole network over the chunk, split over the mesh (the
variants share the weights, or each has its own), and ``PrefixForm`` runs the intact network
once per batch and each variant only from its first deleted or moved block on
(shared_prefix.py). The engine only chunks, places and remembers the variants.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import numpy as np

from resnet_ensemble import evaluate, gates as gates_lib, shared_prefix
from resnet_ensemble.layout import BlockLayout
from resnet_ensemble.surgery import reorder_stacked
from resnet_ensemble.progress import Progress, say
from resnet_ensemble.sharding import put, put_tree, replicated, sharded


def make_variant_evaluator(eval_fn: Callable, layout: BlockLayout, mesh,
                           reorder: bool = True) -> Callable:
  """``fn(variables, images, labels, mask, gates (G, n), orders (G, n)) -> {error, loss,
  loss_sum, correct, count}`` (G,), count being the number of unmasked images; without
  ``reorder``,
  ``fn(variables, images, labels, mask, gates)`` for variants in the trained order.

  Reordered variants each get their own weights (a gather per variant), so vmap turns every
  convolution into a grouped one; gated variants share the weights, and their convolutions
  see one batch of G x images. Which form is faster depends on the hardware (shared on the
  CPU, grouped on a GPU for narrow networks): see ``LesionEngine``'s ``variant_weights``.
  ``eval_fn`` is
  ``evaluate.make_eval_fn(...)``; G must be a multiple of the device count."""

  def one(variables, images, labels, mask, gates, order=None):
    if order is not None:
      variables = reorder_stacked(variables, layout, order)
    out = eval_fn(variables, images, labels, mask, gates)
    return {k: out[k] for k in ("error", "loss", *evaluate.SUMS)}

  rep, split = replicated(mesh), sharded(mesh)
  variant_axes = (0, 0) if reorder else (0,)
  batched = jax.vmap(one, in_axes=(None, None, None, None) + variant_axes)
  # Outputs replicated: a few floats per variant, readable on every process.
  return jax.jit(batched, in_shardings=(rep,) * 4 + (split,) * len(variant_axes),
                 out_shardings=rep)


VARIANT_WEIGHTS = ("auto", "shared", "per_variant", "prefix")
AUTO_PER_VARIANT_MAX_CHANNELS = 64  # the widths where per_variant was measured faster


def resolve_variant_weights(variant_weights: str, variables=None) -> str:
  """``lesion.variant_weights`` for this machine and network. "auto" is "prefix" off GPUs
  (every variant one pass over the batch from its first change on, ~2x fewer FLOPs for E1
  and no G x images batch spilling out of the caches); on GPUs it is per_variant for networks
  whose convolutions have at most 64 output channels (the CIFAR ResNets, where grouped
  convolutions keep a GPU's tiles fuller) and shared otherwise (wide ImageNet layers already
  fill the GPU's tiles), until the prefix form is measured there."""
  if variant_weights not in VARIANT_WEIGHTS:
    raise ValueError(f"lesion.variant_weights={variant_weights!r}; valid: "
                     f"{', '.join(VARIANT_WEIGHTS)}")
  if variant_weights != "auto":
    return variant_weights
  if jax.devices()[0].platform != "gpu":
    return "prefix"
  kernels = [v.shape[-1] for v in jax.tree.leaves(variables) if np.ndim(v) == 4]
  narrow = bool(kernels) and max(kernels) <= AUTO_PER_VARIANT_MAX_CHANNELS
  return "per_variant" if narrow else "shared"


PREFIX_BUDGET_CPU = 2 << 30  # bytes of kept block inputs on a CPU (host memory)
PREFIX_BUDGET_SHARE = 0.25   # share of an accelerator's memory the kept block inputs may take


def prefix_budget_bytes() -> int:
  """How many bytes the prefix form may keep: a quarter of the device's memory where the
  device says (GPUs, TPUs), else ``PREFIX_BUDGET_CPU``."""
  try:
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001 (backends without memory statistics)
    limit = None
  return int(limit * PREFIX_BUDGET_SHARE) if limit else PREFIX_BUDGET_CPU


class WholeNetworkForm:
  """The "shared" and "per_variant" forms: each variant runs the whole network over the test
  batch, a chunk of variants split over the devices. ``shared``: a chunk in the trained order
  shares the weights (``fn_gated``, one batch of G x images); any other chunk, and every chunk
  per_variant, gives each variant weights of its own (``fn``, grouped convolutions)."""

  def __init__(self, eval_fn: Callable, layout: BlockLayout, mesh, shared: bool):
    self.name = "shared" if shared else "per_variant"
    self.shared, self.split = shared, sharded(mesh)
    self.fn = make_variant_evaluator(eval_fn, layout, mesh)
    self.fn_gated = make_variant_evaluator(eval_fn, layout, mesh, reorder=False)

  def in_trained_order(self, orders: np.ndarray) -> bool:
    """Does this chunk run without orders (all variants in the trained order, weights
    shared)?"""
    return self.shared and bool(np.all(orders == np.arange(orders.shape[1])))

  def __call__(self, variables, images, labels, mask, gates: jax.Array,
               orders: jax.Array | None) -> dict:
    if orders is None:
      return self.fn_gated(variables, images, labels, mask, gates)
    return self.fn(variables, images, labels, mask, gates, orders)


class PrefixForm:
  """The "prefix" form: the intact network runs once per batch and each variant from its first
  deleted or moved block on (``shared_prefix``); the variants run one after another over the
  whole batch, so they are not split over devices (the chunk is any size)."""

  name = "prefix"

  def __init__(self, model, mean, std, base_gates: np.ndarray, mesh):
    self.split = replicated(mesh)
    self.fn_prefix = jax.jit(shared_prefix.make_prefix_evaluator(model, mean, std),
                             out_shardings=replicated(mesh))
    self.base = put(base_gates, replicated(mesh))

  def in_trained_order(self, orders: np.ndarray) -> bool:
    return False  # one program takes every variant with its order

  def __call__(self, variables, images, labels, mask, gates: jax.Array,
               orders: jax.Array | None) -> dict:
    return self.fn_prefix(variables, images, labels, mask, self.base, gates, orders)


class LesionEngine:
  """Evaluates any number of variants in fixed-size chunks, each chunk by ``form`` over one
  pass of ``batches``: one compilation for gated variants in the trained order (E1, E3) with
  shared weights, one for variants with weights of their own (E4's reorders; E1/E3 too where
  the form is per_variant), or one for every variant evaluated from the shared prefix."""

  def __init__(self, form, layout: BlockLayout, variables, batches: Iterable, mesh,
               chunk: int, base_gates: np.ndarray | None = None):
    """``batches``: a pass over the test set (``eval_batches``), iterated once per chunk.
    ``base_gates``: the trained network's test-time gates (stochastic depth or effective
    paths scale residuals by their expected gate); every variant's gates multiply them."""
    if chunk % mesh.size:
      chunk = mesh.size * math.ceil(chunk / mesh.size)
    self.form, self.layout, self.chunk, self.batches = form, layout, chunk, batches
    self.base_gates = (np.ones((layout.n_blocks,), np.float32) if base_gates is None
                       else np.asarray(base_gates, np.float32))
    self.variables = put_tree(variables, replicated(mesh))
    self.images: int | None = None  # test images each variant is evaluated on: known after a pass
    self.known: dict[bytes, float] = {}  # test error of each variant evaluated so far

  def _chunk_errors(self, gates: jax.Array, orders: jax.Array | None) -> np.ndarray:
    """Test error of one chunk of variants (device arrays, split as the form says; ``orders``
    None: all in the trained order), counted on the device over one pass and read once."""
    out = evaluate.total(self.form(self.variables, *batch, gates, orders)
                         for batch in self.batches)
    error, count = jax.device_get((out["error"], out["count"]))
    if not np.all(count > 0):
      raise ValueError("the test pass held no images (check eval.max_images and the data)")
    self.images = int(count[0])
    return np.asarray(error)

  def evaluate(self, gates: np.ndarray | None = None, orders: np.ndarray | None = None,
               desc: str = "lesions") -> np.ndarray:
    """Test error of every variant (rows of ``gates`` / ``orders``; missing = intact).

    Each distinct variant is evaluated once per engine: repeats (E3's k = 0 draws, a k = 1
    draw that E1 already measured, swaps that undo each other) reuse the error in ``known``."""
    n = self.layout.n_blocks
    count = len(gates) if gates is not None else len(orders)
    gates = np.ones((count, n), np.float32) if gates is None else np.asarray(gates, np.float32)
    orders = np.tile(np.arange(n), (count, 1)) if orders is None else np.asarray(orders)
    if gates.shape != (count, n) or orders.shape != (count, n):
      raise ValueError(f"gates and orders must both have shape ({count}, {n}); got "
                       f"{gates.shape} and {orders.shape}")
    orders = orders.astype(np.int32)
    keys = [g.tobytes() + o.tobytes() for g, o in zip(gates, orders)]
    first = {}
    for row, key in enumerate(keys):
      if key not in self.known:
        first.setdefault(key, row)
    rows = np.fromiter(first.values(), int, len(first))
    if len(rows) < count:
      say(f"{desc}: {count - len(rows)} of {count} variants repeat ones already evaluated")
    progress = Progress(len(rows), desc, unit="variants", every_s=10.0)
    for start in range(0, len(rows), self.chunk):
      sel = rows[start:start + self.chunk]
      pad = self.chunk - len(sel)  # intact networks: free in the prefix form
      g = np.concatenate([gates[sel], np.ones((pad, n), np.float32)])
      o = np.concatenate([orders[sel], np.tile(np.arange(n, dtype=np.int32), (pad, 1))])
      split = self.form.split
      out = self._chunk_errors(put(g * self.base_gates, split),
                               None if self.form.in_trained_order(o) else put(o, split))
      self.known.update(zip((keys[r] for r in sel), out[:len(sel)].tolist()))
      progress.update(start + len(sel))
    return np.asarray([self.known[key] for key in keys], np.float64)


def build_engine(model, variables, source, mesh, *, batch_size: int, chunk: int,
                 max_images: int = 0, base_gates: np.ndarray | None = None,
                 variant_weights: str = "auto", prefix_budget: int | None = None) -> LesionEngine:
  """The lesion engine for ``model`` with ``variables`` on an evaluation source (``data.
  ImageDataset``, ``imagenet.StreamedValidation``): its first ``max_images`` test images (0:
  all) in batches of ``batch_size``. ``variant_weights``: "shared", "per_variant", "prefix" or
  "auto" (``resolve_variant_weights``); the errors are the same either way. The prefix form
  keeps every block's input for a batch: its batches are cut to what fits ``prefix_budget``
  bytes (default ``prefix_budget_bytes()``)."""
  layout = model.layout
  base = (np.ones((layout.n_blocks,), np.float32) if base_gates is None
          else np.asarray(base_gates, np.float32))
  name = resolve_variant_weights(variant_weights, variables)
  if name == "prefix":
    budget = prefix_budget_bytes() if prefix_budget is None else prefix_budget
    batch_size = shared_prefix.batch_for_budget(
        batch_size, shared_prefix.kept_bytes_per_image(model, source.input_shape), budget,
        multiple=mesh.size)
    form = PrefixForm(model, source.mean, source.std, base, mesh)
  else:
    form = WholeNetworkForm(evaluate.make_eval_fn(model, source.mean, source.std), layout,
                            mesh, shared=name == "shared")
  return LesionEngine(form, layout, variables, source.eval_batches(batch_size, max_images, mesh),
                      mesh, chunk, base)


def make_engine(config, t, mesh) -> LesionEngine:
  """The lesion engine for the restored network ``t`` on its evaluation source, as ``config``
  says (``eval.batch_size``, ``eval.max_images``, ``lesion.chunk``, ``lesion.variant_weights``,
  the test-time gates of ``config.gates``)."""
  return build_engine(t.model, t.variables, t.dataset, mesh, batch_size=config.eval.batch_size,
                      chunk=config.lesion.chunk, max_images=config.eval.max_images,
                      base_gates=gates_lib.eval_gates(config.gates, t.layout),
                      variant_weights=config.lesion.variant_weights)
