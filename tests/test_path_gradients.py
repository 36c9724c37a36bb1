"""Routed gradients are exact: all 2^n paths sum to the true gradient, and a path's norm keeps
its digits however far below float32's range it lies."""

import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from resnet_ensemble import augment, data as data_lib, models, path_gradients, restore
from tests.conftest import REPO, tiny_config

NETS = {
    "preact": models.ResNet(stage_sizes=(2, 2, 2), widths=(4, 8, 8)),
    "postact": models.ResNet(stage_sizes=(2, 2, 2), widths=(4, 8, 8), preact=False),
    "plain": models.PlainNet(stage_sizes=(2, 2, 2), width=4),
}


def _setup(model, seed=0):
  x = jax.random.normal(jax.random.key(seed), (6, 8, 8, 3))
  labels = jnp.arange(6) % 10
  v = jax.jit(model.init)(jax.random.key(1), x)
  _, mut = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x + 1)
  return {"params": v["params"], "batch_stats": mut["batch_stats"]}, x, labels


def _loss(model, v, x, labels):
  logits = model.apply(v, x)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


@pytest.mark.parametrize("kind", list(NETS))
def test_unrolled_network_is_the_network(kind):
  model = NETS[kind]
  v, x, _ = _setup(model)
  u = models.unroll(model, v)
  y = u.embed(x)
  for branches, merge in zip(u.branches, u.merges):
    s, f = branches(y)
    y = merge(s + f)
  np.testing.assert_allclose(u.head(y), model.apply(v, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(NETS))
def test_routed_gradients_of_all_paths_sum_to_the_gradient(kind):
  model = NETS[kind]
  v, x, labels = _setup(model)
  n = model.layout.n_blocks
  every_path = np.asarray(list(itertools.product([0.0, 1.0], repeat=n)), np.float32)  # 2^6

  def routed(selections):
    g_n, bv, mv, ev = path_gradients.linearize(models.unroll(model, v), x, labels)
    return jax.vmap(lambda s: path_gradients.routed_backward(g_n, bv, mv, ev, s))(selections)

  g0, g_image = jax.jit(routed)(every_path)
  expected_image = jax.grad(lambda im: _loss(model, v, im, labels))(x)
  np.testing.assert_allclose(g_image.sum(0), expected_image, rtol=1e-4, atol=1e-6)
  u = models.unroll(model, v)

  def from_y0(y):
    for branches, merge in zip(u.branches, u.merges):
      s, f = branches(y)
      y = merge(s + f)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(u.head(y)), labels[:, None], 1))

  np.testing.assert_allclose(g0.sum(0), jax.grad(from_y0)(u.embed(x)), rtol=1e-4, atol=1e-6)
  # Paths are not all alike: the gradient differs between path lengths.
  norms = np.linalg.norm(np.asarray(g0).reshape(len(every_path), -1), axis=1)
  assert norms.std() > 0


def test_routed_gradients_of_a_scaled_network_sum_to_its_gradient():
  # A stochastic-depth / effective-path model is evaluated with residual i scaled by its
  # expected gate: the routed gradients must be those of that network.
  model = NETS["preact"]
  v, x, labels = _setup(model)
  scales = np.asarray([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], np.float32)
  every_path = np.asarray(list(itertools.product([0.0, 1.0], repeat=6)), np.float32)

  def routed(selections):
    g_n, bv, mv, ev = path_gradients.linearize(models.unroll(model, v), x, labels, scales)
    return jax.vmap(lambda s: path_gradients.routed_backward(g_n, bv, mv, ev, s))(selections)

  _, g_image = jax.jit(routed)(every_path)
  expected = jax.grad(lambda im: _loss_gated(model, v, im, labels, scales))(x)
  np.testing.assert_allclose(g_image.sum(0), expected, rtol=1e-4, atol=1e-6)
  unscaled = jax.grad(lambda im: _loss(model, v, im, labels))(x)
  assert not np.allclose(expected, unscaled, rtol=1e-2)  # the scaling matters


def _loss_gated(model, v, x, labels, gates):
  logits = model.apply(v, x, gates=jnp.asarray(gates))
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def test_the_empty_path_is_the_gradient_through_the_shortcuts_alone():
  # One stage, no downsampling: every shortcut is the identity (pre-activation), so the path
  # that enters no residual module carries dLoss/dy_n unchanged to y_0.
  model = models.ResNet(stage_sizes=(4,), widths=(4,))
  v, x, labels = _setup(model)
  g_n, bv, mv, ev = path_gradients.linearize(models.unroll(model, v), x, labels)
  g0, _ = path_gradients.routed_backward(g_n, bv, mv, ev, jnp.zeros(4))
  np.testing.assert_allclose(g0, g_n, rtol=1e-6, atol=1e-7)


def test_paths_computed_together_equal_paths_computed_apart():
  model = NETS["preact"]
  v, x, labels = _setup(model)
  fn = jax.jit(path_gradients.make_path_gradient_fn(lambda v: models.unroll(model, v)))
  sel = path_gradients.sample_selections(np.random.default_rng(0), 6, 3, 5)
  together = [norms.float64() for norms in fn(v, x, labels, sel)]
  for i in range(5):
    apart = [norms.float64() for norms in fn(v, x, labels, sel[i:i + 1])]
    np.testing.assert_allclose(together[0][i], apart[0][0], rtol=1e-5)
    np.testing.assert_allclose(together[1][i], apart[1][0], rtol=1e-5)


def test_selections_have_exactly_k_blocks():
  rng = np.random.default_rng(0)
  for k in range(7):
    sel = path_gradients.sample_selections(rng, 6, k, 50)
    assert (sel.sum(1) == k).all()
  with pytest.raises(ValueError, match="k=7 is outside 0..6"):
    path_gradients.sample_selections(rng, 6, 7, 1)


@pytest.mark.parametrize("kind", list(NETS))
def test_a_pair_routes_a_path_and_its_complement(kind):
  model = NETS[kind]
  v, x, labels = _setup(model)
  sel = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])

  def routed(s):
    g_n, bv, mv, ev = path_gradients.linearize(models.unroll(model, v), x, labels, jnp.full(6, 0.9))
    return (path_gradients.routed_backward_pair(g_n, bv, mv, ev, s),
            path_gradients.routed_backward(g_n, bv, mv, ev, s),
            path_gradients.routed_backward(g_n, bv, mv, ev, 1 - s))

  (path, complement), alone, alone_complement = jax.jit(routed)(sel)
  for got, want in ((path, alone), (complement, alone_complement)):
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_paired_norms_are_the_norms_of_the_paths_and_their_complements():
  model = NETS["postact"]
  v, x, labels = _setup(model)
  unroll = lambda v: models.unroll(model, v)  # noqa: E731
  sel = path_gradients.sample_selections(np.random.default_rng(0), 6, 2, 4)
  paired = jax.jit(path_gradients.make_path_gradient_fn(unroll, paired=True))(v, x, labels, sel)
  single = jax.jit(path_gradients.make_path_gradient_fn(unroll))(v, x, labels,
                                                          np.concatenate([sel, 1 - sel]))
  paired, single = ([norms.float64() for norms in out] for out in (paired, single))
  for got, want in zip(paired, single):
    assert got.shape == (8,)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("n, samples", [(6, 4), (6, 5), (7, 3)])
def test_paired_selections_give_every_length_its_samples(n, samples):
  selections, lengths = path_gradients.paired_selections(np.random.default_rng(0), n, samples)
  routed = np.concatenate([selections, 1 - selections])  # what paired=True routes
  np.testing.assert_array_equal(routed.sum(1), lengths)
  for k in range(n + 1):
    assert (lengths == k).sum() in (samples, samples + 1)  # + 1: the spare of an odd middle
  assert len(routed) <= (n + 1) * samples + 1


def test_one_ahead_hands_out_each_chunk_after_dispatching_the_next():
  events = []

  def dispatched():
    for c in range(3):
      events.append(f"dispatch {c}")
      yield c

  for c in path_gradients.one_ahead(dispatched()):
    events.append(f"read {c}")
  assert events == ["dispatch 0", "dispatch 1", "read 0", "dispatch 2", "read 1", "read 2"]
  assert list(path_gradients.one_ahead([])) == []


@pytest.mark.parametrize("kind", list(NETS))
def test_routed_pairs_of_all_paths_sum_to_the_gradient(kind):
  model = NETS[kind]
  v, x, labels = _setup(model)
  half = np.asarray(list(itertools.product([0.0, 1.0], repeat=5)), np.float32)
  selections = np.concatenate([np.zeros((32, 1), np.float32), half], 1)  # each pair once

  def routed(selections):
    g_n, bv, mv, ev = path_gradients.linearize(models.unroll(model, v), x, labels)
    return jax.vmap(lambda s: path_gradients.routed_backward_pair(g_n, bv, mv, ev, s))(selections)

  (_, path), (_, complement) = jax.jit(routed)(selections)
  expected = jax.grad(lambda im: _loss(model, v, im, labels))(x)
  np.testing.assert_allclose(path.sum(0) + complement.sum(0), expected, rtol=1e-4, atol=1e-6)


# ResNet-110 (n = 54, width 4) at init with every residual scaled by 1/16 at test time (as
# stochastic depth or effective paths scale it, only more): a path through k residual branches
# carries about (1/30)^k of the gradient, ~1e-90 at k = 54, where squaring float32 entries (and
# soon the entries themselves) underflow to zero.
DEEP = models.ResNet(stage_sizes=(18, 18, 18), widths=(4, 8, 16))
DEEP_N = 54
DEEP_SCALES = np.full(DEEP_N, 1 / 16, np.float32)


def _float64_norms(model, variables, x, labels, scales, selections):
  """The routed gradients' norms the plain way (no rescaling: the chain of the first routed
  backward), in float64, where the longest paths' ~1e-90 are far inside the range."""
  with jax.enable_x64(True):
    m = model.clone(dtype=jnp.float64)
    v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)

    def norms(selections):
      g_n, bv, mv, ev = path_gradients.linearize(models.unroll(m, v), jnp.asarray(x, jnp.float64),
                                          labels, jnp.asarray(scales, jnp.float64))

      def one(selection):
        g = g_n
        for i in reversed(range(len(bv))):
          (g_z,) = mv[i](g)
          shortcut_vjp, branch_vjp = bv[i]
          g = shortcut_vjp(g_z * (1 - selection[i]))[0] + branch_vjp(g_z * selection[i])[0]
        return jnp.linalg.norm(g.ravel()), jnp.linalg.norm(ev(g)[0].ravel())

      return jax.vmap(one)(selections)

    y0, image = jax.jit(norms)(jnp.asarray(selections, jnp.float64))
    return np.asarray(y0, np.float64), np.asarray(image, np.float64)


@pytest.fixture(scope="module")
def deep():
  v, x, labels = _setup(DEEP)
  rng = np.random.default_rng(0)
  single = np.concatenate([path_gradients.sample_selections(rng, DEEP_N, k, 1)
                           for k in range(DEEP_N + 1)])  # one path of every length
  paired, _ = path_gradients.paired_selections(rng, DEEP_N, 1)
  every = np.concatenate([single, paired, 1 - paired])  # what the two forms route
  y0, image = _float64_norms(DEEP, v, x, labels, DEEP_SCALES, every)
  return dict(v=v, x=x, labels=labels, single=single, paired=paired,
              want={False: (y0[:len(single)], image[:len(single)]),
                    True: (y0[len(single):], image[len(single):])})


@pytest.mark.parametrize("paired", [False, True])
def test_every_path_length_keeps_its_norm_in_float32(deep, paired):
  fn = path_gradients.make_path_gradient_fn(lambda v: models.unroll(DEEP, v), scales=DEEP_SCALES,
                                     paired=paired)
  selections = deep["paired" if paired else "single"]
  routed = np.concatenate([selections, 1 - selections]) if paired else selections
  assert sorted(set(routed.sum(1))) == list(range(DEEP_N + 1))  # every length 0..n
  y0, image = jax.jit(fn)(deep["v"], deep["x"], deep["labels"], selections)
  want_y0, want_image = deep["want"][paired]
  assert want_y0.min() < 1e-60 and want_y0.max() > 1e-6  # far below float32 (1.4e-45) to O(1)
  for got, want in ((y0, want_y0), (image, want_image)):
    np.testing.assert_allclose(got.float64(), want, rtol=1e-4)
    np.testing.assert_allclose(got.log10(), np.log10(want), atol=1e-4 / math.log(10))


@pytest.mark.parametrize("stream", [None, jnp.float32])
def test_every_path_length_keeps_its_norm_in_bfloat16(deep, stream):
  # bf16 has float32's exponent range, so the same underflow; its 8-bit mantissa makes the
  # network another function (paths differ from float64 by up to 0.37 decades, measured), so
  # this compares magnitudes over the 80 decades, not digits. stream=float32: bf16 branches on
  # a float32 identity path (model.stream_dtype), where s + f is float32 and f is bf16.
  model = DEEP.clone(dtype=jnp.bfloat16, stream_dtype=stream)
  fn = path_gradients.make_path_gradient_fn(lambda v: models.unroll(model, v), scales=DEEP_SCALES,
                                     paired=True)
  y0, image = jax.jit(fn)(deep["v"], deep["x"], deep["labels"], deep["paired"])
  for got, want in zip((y0, image), deep["want"][True]):
    assert np.all(got.float64() > 0)
    np.testing.assert_allclose(got.log10(), np.log10(want), atol=0.5)


def _scaled_resnet110_workdir(tmp_path):
  """A published-style workdir (variables.msgpack, no checkpoints) of a ResNet-110 (width 4)
  at init, its BN statistics from 64 digits, tested with 3 of 54 blocks kept in expectation
  (effective paths, k = 3: each residual but the two downsampling ones scaled by 1/52)."""
  config = tiny_config(**{"model.depth": 110, "gates.sampler": "effective", "gates.k": 3,
                          "paths.samples_per_k": 1, "paths.batch_size": 8})
  dataset = data_lib.load(config.data)
  model = models.build(config.model, dataset.num_classes)
  x = augment.normalize(dataset.train_images[:64], dataset.mean, dataset.std)
  v = jax.jit(model.init)(jax.random.key(1), x)
  _, mut = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  payload = {"step": 0, "variables": jax.tree.map(
      np.asarray, {"params": v["params"], "batch_stats": mut["batch_stats"]})}
  (tmp_path / restore.VARIABLES_FILE).write_bytes(serialization.msgpack_serialize(payload))
  return config, str(tmp_path)


def test_a_resnet110_study_has_a_mean_at_every_length(tmp_path):
  config, workdir = _scaled_resnet110_workdir(tmp_path)
  out = path_gradients.run_study(config, workdir, allow_unfinished=True)  # a network at init
  assert out["finished"] is False
  assert out == json.load(open(os.path.join(workdir, "gradients.json")))
  _check_every_length(out, 54)
  assert out["gradient"]["log10_mean_norm"][-1] < -60  # far below float32: range kept


def test_published_resnet110_paths_have_a_mean_at_every_length():
  with open(os.path.join(REPO, "results/cifar10/resnet110_seed0/paths.json")) as f:
    _check_every_length(json.load(f), 54)


def _check_every_length(out, n):
  g = out["gradient"]
  assert out["n"] == n and g["k"] == list(range(n + 1))
  for key in ("mean_norm", "mean_norm_image"):
    mean = np.asarray(g[key], np.float64)
    assert mean.shape == (n + 1,) and np.all(np.isfinite(mean)), key
    assert np.all(mean > 0), f"{key} is 0 at lengths {np.flatnonzero(mean == 0).tolist()}"
    np.testing.assert_allclose(np.log10(mean), g["log10_" + key], atol=1e-9)
  log10_total = np.asarray(out["log10_total_gradient"], np.float64)
  np.testing.assert_allclose(
      log10_total, [math.log10(math.comb(n, k)) for k in range(n + 1)]
      + np.asarray(g["log10_mean_norm"]), atol=1e-9)
  lo, hi = out["effective_interval"]
  assert 0 <= lo <= hi <= n


def test_a_length_s_samples_come_from_different_batches(tmp_path):
  # The empty path is one path: its samples differ only by their batch. In length order
  # its 4 pairs would fill the first chunk (one batch) and their norms would be equal.
  config = tiny_config(**{"paths.samples_per_k": 4, "paths.chunk": 8, "paths.batch_size": 8})
  from resnet_ensemble import train
  train.train_and_evaluate(config, str(tmp_path))
  g = path_gradients.run_study(config, str(tmp_path))["gradient"]
  assert g["std_norm"][0] > 0.01 * g["mean_norm"][0]
