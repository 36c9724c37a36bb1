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
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, Iterator, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble.models import Unrolled


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
    block_vjps.append((shortcut_vjp, branch_vjp))
    merge_vjps.append(merge_vjp)

  def loss(y_n):
    logits = unrolled.head(y_n)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  g_n = jax.grad(loss)(y)
  return g_n, block_vjps, merge_vjps, embed_vjp


def _scaled(branches: Callable, scale) -> Callable:
  def scaled(y):
    s, f = branches(y)
    return s, f * jnp.asarray(scale, f.dtype)
  return scaled


def routed_backward(g_n, block_vjps, merge_vjps, embed_vjp, selection: jax.Array):
  """dLoss/dy_0 and dLoss/d(image) along the path ``selection`` (n,) of 0/1."""
  g = g_n
  for i in reversed(range(len(block_vjps))):
    (g_z,) = merge_vjps[i](g)
    sel = selection[i].astype(g_z.dtype)
    shortcut_vjp, branch_vjp = block_vjps[i]
    g = shortcut_vjp(g_z * (1 - sel))[0] + branch_vjp(g_z * sel)[0]
  (g_image,) = embed_vjp(g)
  return g, g_image


def routed_backward_pair(g_n, block_vjps, merge_vjps, embed_vjp, selection: jax.Array):
  """``routed_backward`` along ``selection`` and along its complement ``1 - selection``, with
  one backward through each residual branch for the two: at block i the path that selects it
  hands its cotangent to f_i, the other to s_i, and each takes back the side it chose."""
  u = v = g_n  # the cotangents of the path and of its complement
  for i in reversed(range(len(block_vjps))):
    (u_z,), (v_z,) = merge_vjps[i](u), merge_vjps[i](v)
    sel = selection[i].astype(u_z.dtype)
    shortcut_vjp, branch_vjp = block_vjps[i]
    (through_f,) = branch_vjp(sel * u_z + (1 - sel) * v_z)
    (through_s,) = shortcut_vjp((1 - sel) * u_z + sel * v_z)
    u = sel * through_f + (1 - sel) * through_s
    v = (1 - sel) * through_f + sel * through_s
  return (u, embed_vjp(u)[0]), (v, embed_vjp(v)[0])


def _norm(g: jax.Array) -> jax.Array:
  return jnp.linalg.norm(g.astype(jnp.float32).ravel())


def make_path_gradient_fn(unrolled_fn: Callable[[dict], Unrolled], scales=None,
                          paired: bool = False) -> Callable:
  """``fn(variables, images, labels, selections (P, n)) -> (norm_y0, norm_image)``: one
  forward, P routed backward passes (vmapped), norms (P,). ``paired``: each selection also
  routes its complement, norms (2P,): the P selections, then their P complements, for about
  the price of P. ``scales``: as in ``linearize``."""

  def fn(variables, images, labels, selections):
    g_n, block_vjps, merge_vjps, embed_vjp = linearize(unrolled_fn(variables), images, labels,
                                                       scales)
    route = routed_backward_pair if paired else routed_backward

    def norms(selection):
      out = route(g_n, block_vjps, merge_vjps, embed_vjp, selection)
      pairs = out if paired else (out,)
      return (jnp.stack([_norm(g0) for g0, _ in pairs]),
              jnp.stack([_norm(g_image) for _, g_image in pairs]))

    y0, image = jax.vmap(norms)(selections)  # (P, 1 or 2)
    return y0.T.reshape(-1), image.T.reshape(-1)

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


def path_batches(config, dataset, mesh) -> Iterator[tuple[jax.Array, jax.Array]]:
  """E6's batches of ``paths.batch_size`` (images, labels), one per chunk of paths, replicated.

  Resident data: a new random training batch per chunk (un-augmented), fixed by (seed, chunk).
  Streamed ImageNet (no resident train split): the full validation batches among the first
  ``eval.max_images`` images, in order, cycled when the chunks outnumber them."""
  from resnet_ensemble import imagenet
  if isinstance(dataset, imagenet.StreamedValidation):
    return _streamed_batches(config, dataset, mesh)
  return _resident_batches(config, dataset, mesh)


def _resident_batches(config, dataset, mesh) -> Iterator[tuple[jax.Array, jax.Array]]:
  from resnet_ensemble.sharding import put, replicated
  n_train, rep = len(dataset.train_labels), replicated(mesh)
  for c in itertools.count():
    idx = np.random.default_rng([config.seed, c]).choice(n_train, config.paths.batch_size,
                                                         replace=False)
    yield put(dataset.train_images[idx], rep), put(dataset.train_labels[idx], rep)


def _streamed_batches(config, dataset, mesh) -> Iterator[tuple[jax.Array, jax.Array]]:
  from resnet_ensemble.sharding import replicate_local
  batch_size = config.paths.batch_size
  while True:
    full = 0
    for images, labels, mask in dataset.batches(batch_size, config.eval.max_images):
      if _on_every_process(bool(mask.all())):  # padded batches would bias the mean loss
        full += 1
        yield replicate_local(images, mesh), replicate_local(labels, mesh)
    if not full:
      raise ValueError(f"E6 needs a whole batch of paths.batch_size={batch_size} images, but "
                       f"the validation stream (eval.max_images={config.eval.max_images}) "
                       f"holds fewer")


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


def _on_every_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def run_study(config, workdir: str, allow_unfinished: bool = False) -> dict:
  """E6 (and the E7 totals) on the newest checkpoint of ``workdir``; writes ``paths.json``."""
  from resnet_ensemble import augment, gates as gates_lib, imagenet, models, paths, results
  from resnet_ensemble import trained
  from resnet_ensemble.progress import Progress
  from resnet_ensemble.sharding import (check_divisible, make_mesh, put, put_tree, replicated,
                                       sharded)
  t = trained.load_trained(config, workdir, allow_unfinished)
  pc, n = config.paths, t.layout.n_blocks
  mesh = make_mesh()
  chunk = mesh.size * math.ceil(pc.chunk / 2 / mesh.size)  # pairs per call
  rng = np.random.default_rng(config.seed)
  selections, lengths = paired_selections(rng, n, pc.samples_per_k)
  mean, std = t.dataset.mean, t.dataset.std
  fn = make_path_gradient_fn(lambda v: models.unroll(t.model, v),
                             scales=gates_lib.eval_gates(config.gates, t.layout), paired=True)
  rep, split = replicated(mesh), sharded(mesh)
  jitted = jax.jit(lambda v, x, y, s: fn(v, augment.normalize(x, mean, std), y, s),
                   in_shardings=(rep, rep, rep, split), out_shardings=(rep, rep))
  variables = put_tree(t.variables, rep)
  q = len(selections)
  norms = np.zeros((2, q, 2))  # (selection | complement, pair, y0 | image)
  streamed = isinstance(t.dataset, imagenet.StreamedValidation)
  if streamed:
    check_divisible(pc.batch_size, mesh, "paths.batch_size")
  batches = path_batches(config, t.dataset, mesh)
  progress = Progress(2 * q, "E6 routed path gradients", unit="paths", every_s=10.0)

  def dispatch(start: int):
    # A new batch for each chunk of paths (un-augmented; BN in inference mode).
    images, labels = next(batches)
    sel = selections[start:start + chunk]
    padded = np.concatenate([sel, np.zeros((chunk - len(sel), n), np.float32)])
    return start, len(sel), jitted(variables, images, labels, put(padded, split))

  for start, used, (y0, image) in one_ahead(map(dispatch, range(0, q, chunk))):
    out = np.stack([np.asarray(y0), np.asarray(image)], 1).reshape(2, chunk, 2)
    norms[:, start:start + used] = out[:, :used]
    progress.update(2 * min(start + chunk, q))
  norms = norms.reshape(2 * q, 2)
  by_k = np.stack([norms[lengths == k][:pc.samples_per_k] for k in range(n + 1)])
  mean_norm = by_k[..., 0].mean(1)
  total = paths.total_gradient(n, mean_norm)
  lo, hi = paths.effective_interval(total, 0.9)
  out = {
      "n": n, **t.describe(), "config": results.config_dict(config),
      "data_source": t.dataset.source,
      "batches_from": "validation" if streamed else "train (un-augmented)",
      "gradient": {"k": list(range(n + 1)), "samples_per_k": pc.samples_per_k,
                   "batch_size": pc.batch_size, "mean_norm": mean_norm.tolist(),
                   "std_norm": by_k[..., 0].std(1).tolist(),
                   "mean_norm_image": by_k[..., 1].mean(1).tolist(),
                   "std_norm_image": by_k[..., 1].std(1).tolist()},
      "total_gradient": total.tolist(),
      "effective_interval": [lo, hi],
      "effective_share_of_paths": float(paths.share_of_paths(n, lo, hi)),
  }
  results.write_json(workdir, "paths.json", out)
  return out
