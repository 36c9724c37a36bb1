"""The lesion engine: many damaged networks (variants) evaluated by one compiled program.

A *variant* of the trained network is a block order (a permutation of the stacked same-shape
blocks, E4) plus a gate vector over positions (zeros delete blocks, E1–E3). The evaluator
``vmap``s the test-set evaluation over a chunk of variants, with the chunk axis sharded over
the mesh and the test set resident on every device; every chunk has the same shape, so a
whole study compiles once. ImageNet's validation set does not fit on the device: there each
chunk of variants makes one pass over a stream of batches instead (``StreamedLesionEngine``).

With resident test images the variants can instead start from the intact network's shared
prefix (``lesion.variant_weights=prefix``, see shared_prefix.py): the trained network runs once
per batch, and each variant only from its first deleted or moved block on.

Each form (``lesion.variant_weights``) is a small strategy the engine calls on a chunk:
``WholeNetworkForm`` (shared or per-variant weights) and ``PrefixForm``; the engine only
chunks, places and remembers the variants.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble import evaluate, gates as gates_lib, shared_prefix
from resnet_ensemble.layout import BlockLayout
from resnet_ensemble.surgery import reorder_stacked
from resnet_ensemble.progress import Progress, say
from resnet_ensemble.sharding import (check_divisible, put, put_tree, replicate_local, replicated,
                                      sharded)


def make_variant_evaluator(eval_fn: Callable, layout: BlockLayout, mesh,
                           reorder: bool = True) -> Callable:
  """``fn(variables, images, labels, mask, gates (G, n), orders (G, n)) -> {error, loss,
  count}`` (G,), count being the number of unmasked images; without ``reorder``,
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
    return {"error": out["error"], "loss": out["loss"], "count": out["count"]}

  rep, split = replicated(mesh), sharded(mesh)
  variant_axes = (0, 0) if reorder else (0,)
  batched = jax.vmap(one, in_axes=(None, None, None, None) + variant_axes)
  # Outputs replicated: a few floats per variant, readable on every process.
  return jax.jit(batched, in_shardings=(rep,) * 4 + (split,) * len(variant_axes),
                 out_shardings=rep)


VARIANT_WEIGHTS = ("auto", "shared", "per_variant", "prefix")
AUTO_PER_VARIANT_MAX_CHANNELS = 64  # the widths where per_variant was measured faster


def resolve_variant_weights(variant_weights: str, variables=None, prefix: bool = False) -> str:
  """``lesion.variant_weights`` for this machine and network. "auto" is "prefix" on the CPU
  where the engine can evaluate from the shared prefix (``prefix``: resident test images;
  every variant one pass over the batch, ~2x fewer FLOPs for E1 and no G x images batch
  spilling out of the caches); on GPUs it is per_variant for networks whose convolutions have
  at most 64 output channels (the CIFAR ResNets, where grouped convolutions keep a GPU's tiles
  fuller) and shared otherwise (wide ImageNet layers already fill the GPU's tiles), until the
  prefix form is measured there."""
  if variant_weights not in VARIANT_WEIGHTS:
    raise ValueError(f"lesion.variant_weights={variant_weights!r}; valid: "
                     f"{', '.join(VARIANT_WEIGHTS)}")
  if variant_weights != "auto":
    return variant_weights
  gpu = jax.devices()[0].platform == "gpu"
  if prefix and not gpu:
    return "prefix"
  kernels = [v.shape[-1] for v in jax.tree.leaves(variables) if np.ndim(v) == 4]
  narrow = bool(kernels) and max(kernels) <= AUTO_PER_VARIANT_MAX_CHANNELS
  return "per_variant" if gpu and narrow else "shared"


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


def rebatch(images: np.ndarray, labels: np.ndarray, mask: np.ndarray, batch: int):
  """Padded test batches (n_batches, B, ...) as batches of ``batch`` images (the unmasked
  images in the same order, padding masked out)."""
  keep = np.asarray(mask).reshape(-1) > 0
  images = np.asarray(images).reshape((-1,) + images.shape[2:])[keep]
  labels = np.asarray(labels).reshape(-1)[keep]
  n = len(labels)
  pad = -n % batch
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
  mask = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
  shape = (-1, batch)
  return (images.reshape(shape + images.shape[1:]), labels.reshape(shape), mask.reshape(shape))


@dataclasses.dataclass(frozen=True)
class Prefix:
  """What the prefix form needs besides ``eval_fn``: ``shared_prefix.make_prefix_evaluator``'s
  function and the bytes of block inputs one image keeps (``kept_bytes_per_image``)."""
  fn: Callable
  bytes_per_image: int

  @classmethod
  def of(cls, model, mean, std, input_shape) -> "Prefix":
    return cls(shared_prefix.make_prefix_evaluator(model, mean, std),
               shared_prefix.kept_bytes_per_image(model, input_shape))


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

  def __init__(self, prefix: Prefix, base_gates: np.ndarray, mesh):
    self.split = replicated(mesh)
    self.fn_prefix = jax.jit(prefix.fn, out_shardings=replicated(mesh))
    self.base = put(base_gates, replicated(mesh))

  def in_trained_order(self, orders: np.ndarray) -> bool:
    return False  # one program takes every variant with its order

  def __call__(self, variables, images, labels, mask, gates: jax.Array,
               orders: jax.Array | None) -> dict:
    return self.fn_prefix(variables, images, labels, mask, self.base, gates, orders)


class LesionEngine:
  """Evaluates any number of variants in fixed-size chunks: one compilation for gated
  variants in the trained order (E1, E3) with shared weights, one for variants with weights
  of their own (E4's reorders; E1/E3 too where ``variant_weights`` says per_variant), or one
  for every variant evaluated from the intact network's shared prefix ("prefix")."""

  def __init__(self, eval_fn: Callable, layout: BlockLayout, variables, test_images,
               test_labels, test_mask, mesh, chunk: int, base_gates: np.ndarray | None = None,
               variant_weights: str = "auto", prefix: Prefix | None = None,
               prefix_budget: int | None = None):
    """``base_gates``: the trained network's test-time gates (stochastic depth or effective
    paths scale residuals by their expected gate); every variant's gates multiply them.
    ``variant_weights``: "shared", "per_variant", "prefix" (needs ``prefix``) or "auto"
    (``resolve_variant_weights``); the errors are the same either way. ``prefix_budget``:
    bytes of kept block inputs per batch (default ``prefix_budget_bytes()``); a larger eval
    batch is split into batches that fit."""
    self._setup(eval_fn, layout, mesh, chunk, base_gates, variant_weights, variables, prefix)
    self.images = int(np.sum(test_mask))  # test images each variant is evaluated on
    if self.form.name == "prefix":  # batches whose kept block inputs fit the budget
      budget = prefix_budget_bytes() if prefix_budget is None else prefix_budget
      self.prefix_batch = shared_prefix.batch_for_budget(
          test_images.shape[1], prefix.bytes_per_image, budget)
      test_images, test_labels, test_mask = rebatch(test_images, test_labels, test_mask,
                                                    self.prefix_batch)
    self.args = put_tree((variables, test_images, test_labels, test_mask), replicated(mesh))

  def _setup(self, eval_fn: Callable, layout: BlockLayout, mesh, chunk: int,
             base_gates: np.ndarray | None, variant_weights: str, variables,
             prefix: Prefix | None = None) -> None:
    if chunk % mesh.size:
      chunk = mesh.size * math.ceil(chunk / mesh.size)
    self.layout, self.chunk, self.mesh = layout, chunk, mesh
    self.base_gates = (np.ones((layout.n_blocks,), np.float32) if base_gates is None
                       else np.asarray(base_gates, np.float32))
    name = resolve_variant_weights(variant_weights, variables, prefix is not None)
    if name == "prefix" and prefix is None:
      raise ValueError("lesion.variant_weights='prefix' needs resident test images and the "
                       "network (lesion.make_engine builds it)")
    self.form = (PrefixForm(prefix, self.base_gates, mesh) if name == "prefix"
                 else WholeNetworkForm(eval_fn, layout, mesh, shared=name == "shared"))
    self.known: dict[bytes, float] = {}  # test error of each variant evaluated so far

  def _chunk_errors(self, gates: jax.Array, orders: jax.Array | None) -> np.ndarray:
    """Test error of one chunk of variants (device arrays, split over the mesh; ``orders``
    None: all in the trained order)."""
    return np.asarray(self.form(*self.args, gates, orders)["error"])

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


class StreamedLesionEngine(LesionEngine):
  """A LesionEngine over a stream of test batches (ImageNet validation, not resident): each
  chunk of variants makes one pass over ``batches()``, counting every variant's errors; all
  batches have one shape, so a whole study still compiles once per kind of variant."""

  def __init__(self, eval_fn: Callable, layout: BlockLayout, variables,
               batches: Callable[[], Iterable[tuple[np.ndarray, ...]]], mesh, chunk: int,
               base_gates: np.ndarray | None = None, variant_weights: str = "auto"):
    """``batches()``: a new pass of this process's ``(images, labels, mask)`` shares."""
    self._setup(eval_fn, layout, mesh, chunk, base_gates, variant_weights, variables)
    self.variables = put_tree(variables, replicated(mesh))
    self.batches = batches
    self.images = None  # known after the first pass

  def _chunk_errors(self, gates: jax.Array, orders: jax.Array | None) -> np.ndarray:
    wrong = count = 0.0
    for batch in self.batches():
      # A stack of one batch (eval_fn scans over stacked batches), whole on every device.
      images, labels, mask = (replicate_local(a[None], self.mesh, axis=1) for a in batch)
      out = self.form(self.variables, images, labels, mask, gates, orders)
      # Counted on the device, read once per pass: the host keeps feeding batches meanwhile.
      wrong = wrong + jnp.where(out["count"] > 0, jnp.round(out["error"] * out["count"]), 0.0)
      count = count + out["count"]
    count = np.asarray(count)
    if not np.all(count > 0):
      raise ValueError("the test stream held no images (check eval.max_images and the data)")
    self.images = int(count[0])
    return np.asarray(wrong) / count


def make_engine(config, t, mesh) -> LesionEngine:
  """The lesion engine for ``t``'s data: resident (CIFAR, digits) or streamed (ImageNet); both
  evaluate on the first ``eval.max_images`` test images (0: all)."""
  eval_fn = evaluate.make_eval_fn(t.model, t.dataset.mean, t.dataset.std)
  common = dict(mesh=mesh, chunk=config.lesion.chunk,
                base_gates=gates_lib.eval_gates(config.gates, t.layout),
                variant_weights=config.lesion.variant_weights)
  batch_size, cap = config.eval.batch_size, config.eval.max_images
  if not t.dataset.resident:
    check_divisible(batch_size, mesh, "eval.batch_size")
    return StreamedLesionEngine(eval_fn, t.layout, t.variables,
                                lambda: t.dataset.test_batches(batch_size, cap), **common)
  batches = t.dataset.padded_test(batch_size, cap)
  prefix = Prefix.of(t.model, t.dataset.mean, t.dataset.std, t.dataset.input_shape)
  return LesionEngine(eval_fn, t.layout, t.variables, *batches, prefix=prefix, **common)
