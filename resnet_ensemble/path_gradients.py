"""Routed gradients (E6): how much gradient flows along paths of each length.

A path is a 0/1 selection over the n blocks. Its gradient is the backward pass that, at block
i, goes only through the residual branch f_i (selected) or only through the shortcut s_i (not
selected). The forward pass and every block's linearisation (``jax.vjp``) are computed once per
batch and shared by all the paths sampled on it; the routed backward chain then runs for many
paths at once under ``vmap``. Since the backward pass is linear in the cotangent, the routed
gradients of all 2^n paths sum exactly to the ordinary gradient.

Paths are routed in complementary pairs (a path of length k and the one that takes every block
it skips, of length n - k): at each block exactly one of the two goes through f_i, so the pair
costs one backward through the residual branches instead of two (``routed_backward_pair``).

Range: a path through k residual branches carries roughly r^k of the gradient (r ~ 0.2 per
block in a trained ResNet-110), so long paths fall far below float32's (and bf16's) range:
squares of their entries flush to zero from length ~20, the entries themselves from ~30 (on
GPUs, which flush subnormals, earlier still). The routed backward is linear in its cotangent,
so each path carries its cotangent as ``value * 2**exponent`` (``Scaled``), renormalised at
every block boundary by a power of two (exact in any float format) so that max|value| stays in
[0.5, 1); norms come from those scaled values and are read out on the host as float64 or log10
(``Scaled.float64``, ``Scaled.log10``), at any path length and depth.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble import (augment, evaluate, gates as gates_lib, models, path_counts,
                             restore, workdir as workdir_lib)
from resnet_ensemble.models import Unrolled
from resnet_ensemble.progress import Progress
from resnet_ensemble.sharding import make_mesh, put, put_tree, replicated, sharded


def linearize(unrolled: Unrolled, images: jax.Array, labels: jax.Array, scales=None):
  """Shared forward: returns (dLoss/dy_n, per-block (shortcut vjp, branch vjp), merge vjps,
  embed vjp).

  ``scales`` (n,): the test-time gates of a gated-trained network (stochastic depth or
  effective paths scale block i's residual by its expected gate), so the routed gradients are
  those of the network that is evaluated; None = all ones."""
  y0, embed_vjp = jax.vjp(unrolled.embed, images)
  y, block_vjps, merge_vjps = y0, [], []
  for i, (branches, merge) in enumerate(zip(unrolled.branches, unrolled.merges)):
    if scales is not None:
      branches = _scaled(branches, scales[i])
    # The shortcut's and the branch's linearisations apart, so that a path pays only for the
    # side it takes (XLA merges the forward the two traces share).
    s, shortcut_vjp = jax.vjp(lambda y, b=branches: b(y)[0], y)
    f, branch_vjp = jax.vjp(lambda y, b=branches: b(y)[1], y)
    y, merge_vjp = jax.vjp(merge, s + f)
    block_vjps.append((_taking(shortcut_vjp, s.dtype), _taking(branch_vjp, f.dtype)))
    merge_vjps.append(merge_vjp)

  def loss(y_n):
    logits = unrolled.head(y_n)
    return jnp.mean(evaluate.cross_entropy(logits, labels))  # the training loss, unsmoothed

  g_n = jax.grad(loss)(y)
  return g_n, block_vjps, merge_vjps, embed_vjp


def _taking(vjp: Callable, dtype) -> Callable:
  """``vjp`` fed its cotangent in its output's dtype: with ``model.stream_dtype=float32`` under
  bf16 compute, s + f is float32 while f is bf16, and a vjp takes only its own output's type
  (the cast is the one ``jax.grad`` makes at that sum)."""
  return lambda g: vjp(g.astype(dtype))


def _scaled(branches: Callable, scale) -> Callable:
  def scaled(y):
    s, f = branches(y)
    return s, f * jnp.asarray(scale, f.dtype)
  return scaled


class Scaled(NamedTuple):
  """``value * 2**exponent``: a routed cotangent (or its norm) kept inside its format's range.

  ``exponent`` is int32, one per path (under vmap, one per row); the number itself may lie
  far below what ``value``'s dtype, or even float64, can hold."""

  value: jax.Array
  exponent: jax.Array

  def float64(self) -> np.ndarray:
    """The numbers as float64 on the host (0 only below float64's ~1e-308)."""
    return np.ldexp(np.asarray(self.value, np.float64), np.asarray(self.exponent))

  def log10(self) -> np.ndarray:
    """log10 of the numbers on the host, exact at any magnitude (-inf for a 0)."""
    with np.errstate(divide="ignore"):
      return (np.log10(np.abs(np.asarray(self.value, np.float64)))
              + np.asarray(self.exponent, np.float64) * math.log10(2.0))

  def unscaled(self) -> jax.Array:
    """``value * 2**exponent`` in ``value``'s dtype (underflows where that format must)."""
    return _times_power_of_two(self.value, self.exponent)


def renormalise(g: jax.Array, exponent=0) -> Scaled:
  """``g * 2**exponent`` rewritten so that max|value| is in [0.5, 1): multiplying by a power of
  two only changes the float exponent, so this rounds nothing; a zero ``g`` keeps its
  exponent."""
  work = _work_dtype(g)
  peak = jnp.max(jnp.abs(g)).astype(work)
  _, shift = jnp.frexp(peak)  # peak = m * 2**shift, m in [0.5, 1); peak = 0 gives shift = 0
  info = jnp.finfo(work)  # 2**-shift must be a normal number of the working format
  shift = jnp.clip(shift, 1 - info.maxexp, -info.minexp).astype(jnp.int32)
  return Scaled(_times_power_of_two(g, -shift), jnp.asarray(exponent, jnp.int32) + shift)


def _work_dtype(x: jax.Array):
  """float32, or x's own dtype where that is wider (float64 under x64)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _times_power_of_two(x: jax.Array, exponent: jax.Array) -> jax.Array:
  """``x * 2**exponent`` in x's dtype, computed in ``_work_dtype`` (exact while the power and
  the result are normal numbers; a product below x's range underflows as it would anyway)."""
  work = _work_dtype(x)
  return (x.astype(work) * jnp.exp2(jnp.asarray(exponent, work))).astype(x.dtype)


def routed_backward_scaled(g_n, block_vjps, merge_vjps, embed_vjp,
                           selection: jax.Array) -> tuple[Scaled, Scaled]:
  """dLoss/dy_0 and dLoss/d(image) along the path ``selection`` (n,) of 0/1, each as
  ``Scaled``: the cotangent is renormalised after every block."""
  g, e = renormalise(g_n)
  for i in reversed(range(len(block_vjps))):
    (g_z,) = merge_vjps[i](g)
    sel = selection[i].astype(g_z.dtype)
    shortcut_vjp, branch_vjp = block_vjps[i]
    g, e = renormalise(shortcut_vjp(g_z * (1 - sel))[0] + branch_vjp(g_z * sel)[0], e)
  (g_image,) = embed_vjp(g)
  return Scaled(g, e), renormalise(g_image, e)


def routed_backward(g_n, block_vjps, merge_vjps, embed_vjp, selection: jax.Array):
  """dLoss/dy_0 and dLoss/d(image) along the path ``selection`` (n,) of 0/1, as plain arrays
  (``routed_backward_scaled``, unscaled: entries below the dtype's range are lost)."""
  g, g_image = routed_backward_scaled(g_n, block_vjps, merge_vjps, embed_vjp, selection)
  return g.unscaled(), g_image.unscaled()


def routed_backward_pair_scaled(g_n, block_vjps, merge_vjps, embed_vjp, selection: jax.Array):
  """``routed_backward_scaled`` along ``selection`` and along its complement
  ``1 - selection``, with one backward through each residual branch for the two: at block i
  the path that selects it hands its cotangent to f_i, the other to s_i, and each takes back
  the side it chose. Each path keeps its own exponent: a 0/1 selection only swaps whole
  cotangents between the two vjps, it never adds a path's cotangent to the other's."""
  (u, eu) = (v, ev) = renormalise(g_n)  # the path and its complement
  for i in reversed(range(len(block_vjps))):
    (u_z,), (v_z,) = merge_vjps[i](u), merge_vjps[i](v)
    sel = selection[i].astype(u_z.dtype)
    shortcut_vjp, branch_vjp = block_vjps[i]
    (through_f,) = branch_vjp(sel * u_z + (1 - sel) * v_z)
    (through_s,) = shortcut_vjp((1 - sel) * u_z + sel * v_z)
    u, eu = renormalise(sel * through_f + (1 - sel) * through_s, eu)
    v, ev = renormalise((1 - sel) * through_f + sel * through_s, ev)
  return ((Scaled(u, eu), renormalise(embed_vjp(u)[0], eu)),
          (Scaled(v, ev), renormalise(embed_vjp(v)[0], ev)))


def routed_backward_pair(g_n, block_vjps, merge_vjps, embed_vjp, selection: jax.Array):
  """``routed_backward`` along ``selection`` and along its complement, as plain arrays
  (``routed_backward_pair_scaled``, unscaled)."""
  pair = routed_backward_pair_scaled(g_n, block_vjps, merge_vjps, embed_vjp, selection)
  return tuple((g.unscaled(), g_image.unscaled()) for g, g_image in pair)


def _norm(g: Scaled) -> Scaled:
  """||g|| as ``Scaled``, from the renormalised entries (max|value| in [0.5, 1), so the sum
  of squares is at least 0.25): no square overflows, and the entries whose squares flush to
  zero (below ~2^-75 of the largest) would add less than 1e-22 per entry to that sum."""
  return Scaled(jnp.linalg.norm(g.value.astype(_work_dtype(g.value)).ravel()), g.exponent)


def _stack(items: list[Scaled]) -> Scaled:
  return jax.tree.map(lambda *a: jnp.stack(a), *items)


def make_path_gradient_fn(unrolled_fn: Callable[[dict], Unrolled], scales=None,
                          paired: bool = False) -> Callable:
  """``fn(variables, images, labels, selections (P, n)) -> (norm_y0, norm_image)``: one
  forward, P routed backward passes (vmapped), norms (P,) as ``Scaled`` (float32 value, int32
  exponent; read them with ``.float64()`` or ``.log10()``). ``paired``: each selection also
  routes its complement, norms (2P,): the P selections, then their P complements, for about
  the price of P. ``scales``: as in ``linearize``."""

  def fn(variables, images, labels, selections):
    g_n, block_vjps, merge_vjps, embed_vjp = linearize(unrolled_fn(variables), images, labels,
                                                       scales)
    route = routed_backward_pair_scaled if paired else routed_backward_scaled

    def norms(selection):
      out = route(g_n, block_vjps, merge_vjps, embed_vjp, selection)
      pairs = out if paired else (out,)
      return (_stack([_norm(g0) for g0, _ in pairs]),
              _stack([_norm(g_image) for _, g_image in pairs]))

    y0, image = jax.vmap(norms)(selections)  # (P, 1 or 2) each
    flat = lambda a: a.T.reshape(-1)  # noqa: E731
    return jax.tree.map(flat, y0), jax.tree.map(flat, image)

  return fn


def sample_selections(rng: np.random.Generator, n: int, k: int, count: int) -> np.ndarray:
  """``count`` paths of length k: uniformly random k-subsets of the n blocks, as 0/1 rows."""
  if not 0 <= k <= n:
    raise ValueError(f"path length k={k} is outside 0..{n} for a network of {n} blocks")
  out = np.zeros((count, n), np.float32)
  for row in out:
    row[rng.choice(n, size=k, replace=False)] = 1.0
  return out


def paired_selections(rng: np.random.Generator, n: int,
                      samples_per_k: int) -> tuple[np.ndarray, np.ndarray]:
  """Paths for ``samples_per_k`` samples of every length 0..n, as complementary pairs: the
  (Q, n) selections to route with ``paired=True`` and the length of each of the 2Q paths
  routed (selections first, then complements); a middle length (n even) is drawn half as
  selections, half as complements, with one spare path when ``samples_per_k`` is odd.

  Each length's samples are independent uniformly random subsets; a length-k sample and the
  length-(n-k) one it is paired with are complements of each other."""
  rows, lengths = [], []
  for k in range(n // 2 + 1):
    count = samples_per_k if 2 * k != n else -(-samples_per_k // 2)
    rows.append(sample_selections(rng, n, k, count))
    lengths.append(np.full(count, k))
  selections = np.concatenate(rows)
  first = np.concatenate(lengths)
  return selections, np.concatenate([first, n - first])


T = TypeVar("T")


def one_ahead(dispatched: Iterable[T]) -> Iterator[T]:
  """Yields each item of ``dispatched`` only once the next one has been taken: with items that
  hold asynchronously dispatched device results, the device computes chunk c + 1 while the
  host reads chunk c back (and prepares the next batch), instead of idling between chunks."""
  previous, started = None, False
  for item in dispatched:
    if started:
      yield previous
    previous, started = item, True
  if started:
    yield previous


def run_study(config, workdir: str, allow_unfinished: bool = False) -> dict:
  """E6 (and the E7 totals) on the newest checkpoint of ``workdir``; writes ``gradients.json``."""
  return study(config, workdir, restore.load_trained(config, workdir, allow_unfinished))


def study(config, workdir: str, t: restore.Trained) -> dict:
  """``run_study`` on a network restored already (as ``lesion.study``)."""
  pc, n = config.paths, t.layout.n_blocks
  mesh = make_mesh()
  chunk = mesh.size * math.ceil(pc.chunk / 2 / mesh.size)  # pairs per call
  rng = np.random.default_rng(config.seed)
  selections, lengths = shuffled_pairs(rng, n, pc.samples_per_k)
  mean, std = t.dataset.mean, t.dataset.std
  fn = make_path_gradient_fn(lambda v: models.unroll(t.model, v),
                             scales=gates_lib.eval_gates(config.gates, t.layout), paired=True)
  rep, split = replicated(mesh), sharded(mesh)
  jitted = jax.jit(lambda v, x, y, s: fn(v, augment.normalize(x, mean, std), y, s),
                   in_shardings=(rep, rep, rep, split), out_shardings=(rep, rep))
  variables = put_tree(t.variables, rep)
  q = len(selections)
  log10 = np.zeros((2, q, 2))  # log10 norms: (selection | complement, pair, y0 | image)
  # On every device: a random train batch per chunk (CIFAR-10), or the validation stream's.
  batches = t.dataset.gradient_batches(pc.batch_size, config.seed, config.eval.max_images, mesh)
  progress = Progress(2 * q, "E6 routed path gradients", unit="paths", every_s=10.0)

  def dispatch(start: int):
    # A new batch for each chunk of paths (un-augmented; BN in inference mode).
    images, labels = next(batches)
    sel = selections[start:start + chunk]
    padded = np.concatenate([sel, np.zeros((chunk - len(sel), n), np.float32)])
    return start, len(sel), jitted(variables, images, labels, put(padded, split))

  for start, used, (y0, image) in one_ahead(map(dispatch, range(0, q, chunk))):
    y0, image = jax.device_get((y0, image))
    out = np.stack([y0.log10(), image.log10()], 1).reshape(2, chunk, 2)
    log10[:, start:start + used] = out[:, :used]
    progress.update(2 * min(start + chunk, q))
  out = {
      "n": n, **t.describe(), "config": workdir_lib.config_dict(config),
      "data_source": t.dataset.source,
      "batches_from": t.dataset.gradient_split,
      **summarise(n, log10.reshape(2 * q, 2), lengths, pc.samples_per_k, pc.batch_size),
  }
  workdir_lib.write_json(workdir, workdir_lib.GRADIENTS_FILE, out)
  return out


def shuffled_pairs(rng: np.random.Generator, n: int,
                   samples_per_k: int) -> tuple[np.ndarray, np.ndarray]:
  """``paired_selections`` with the pairs in random order: a chunk (one batch) then holds paths
  of many lengths, and a length's samples come from about as many batches as it has samples;
  in length order they would share one or two batches, and the batch-to-batch spread of the
  loss gradient would move whole lengths together."""
  selections, lengths = paired_selections(rng, n, samples_per_k)
  order = rng.permutation(len(selections))
  return selections[order], np.concatenate(
      [lengths[:len(order)][order], lengths[len(order):][order]])


def summarise(n: int, log10: np.ndarray, lengths: np.ndarray, samples_per_k: int,
              batch_size: int) -> dict:
  """gradients.json's E6/E7 fields from the routed norms ``log10`` (paths, 2): log10 of each
  path's norm at the first block's input and at the input, ``lengths`` each path's length."""
  by_k = np.stack([log10[lengths == k][:samples_per_k] for k in range(n + 1)])
  (mean_y0, std_y0), (mean_image, std_image) = (
      path_counts.log10_mean_std(by_k[..., j]) for j in range(2))  # (n + 1,) each
  log10_total = path_counts.log10_total_gradient(n, mean_y0)
  lo, hi = path_counts.effective_interval(path_counts.relative_weights(log10_total),
                                          path_counts.E7_MASS)
  return {
      "sampler": "complementary pairs",
      "gradient": {"k": list(range(n + 1)), "samples_per_k": samples_per_k,
                   "batch_size": batch_size,
                   "mean_norm": _json_power(mean_y0), "std_norm": _json_power(std_y0),
                   "mean_norm_image": _json_power(mean_image),
                   "std_norm_image": _json_power(std_image),
                   "log10_mean_norm": _json_log10(mean_y0), "log10_std_norm": _json_log10(std_y0),
                   "log10_mean_norm_image": _json_log10(mean_image),
                   "log10_std_norm_image": _json_log10(std_image)},
      "total_gradient": _json_power(log10_total),
      "log10_total_gradient": _json_log10(log10_total),
      "effective_interval": [lo, hi],
      "effective_share_of_paths": float(path_counts.share_of_paths(n, lo, hi)),
  }


def _json_power(log10: np.ndarray) -> list[float]:
  """10**log10 as float64 values (0.0 for a zero, and only below float64's ~1e-308)."""
  return (10.0 ** np.asarray(log10, np.float64)).tolist()


def _json_log10(log10: np.ndarray) -> list[float | None]:
  """log10 values for JSON: null for a zero (log10 = -inf), which JSON cannot write."""
  return [float(x) if np.isfinite(x) else None for x in np.asarray(log10, np.float64)]
