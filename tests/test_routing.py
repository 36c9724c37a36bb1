"""Routed gradients are exact: all 2^n paths sum to the true gradient."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_ensemble import models, routing

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
    g_n, bv, mv, ev = routing.linearize(models.unroll(model, v), x, labels)
    return jax.vmap(lambda s: routing.routed_backward(g_n, bv, mv, ev, s))(selections)

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
    g_n, bv, mv, ev = routing.linearize(models.unroll(model, v), x, labels, scales)
    return jax.vmap(lambda s: routing.routed_backward(g_n, bv, mv, ev, s))(selections)

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
  g_n, bv, mv, ev = routing.linearize(models.unroll(model, v), x, labels)
  g0, _ = routing.routed_backward(g_n, bv, mv, ev, jnp.zeros(4))
  np.testing.assert_allclose(g0, g_n, rtol=1e-6, atol=1e-7)


def test_paths_computed_together_equal_paths_computed_apart():
  model = NETS["preact"]
  v, x, labels = _setup(model)
  fn = jax.jit(routing.make_path_gradient_fn(lambda v: models.unroll(model, v)))
  sel = routing.sample_selections(np.random.default_rng(0), 6, 3, 5)
  together = fn(v, x, labels, sel)
  for i in range(5):
    apart = fn(v, x, labels, sel[i:i + 1])
    np.testing.assert_allclose(together[0][i], apart[0][0], rtol=1e-5)
    np.testing.assert_allclose(together[1][i], apart[1][0], rtol=1e-5)


def test_selections_have_exactly_k_blocks():
  rng = np.random.default_rng(0)
  for k in range(7):
    sel = routing.sample_selections(rng, 6, k, 50)
    assert (sel.sum(1) == k).all()
  with pytest.raises(ValueError, match="k=7 is outside 0..6"):
    routing.sample_selections(rng, 6, 7, 1)


@pytest.mark.parametrize("kind", list(NETS))
def test_a_pair_routes_a_path_and_its_complement(kind):
  model = NETS[kind]
  v, x, labels = _setup(model)
  sel = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])

  def routed(s):
    g_n, bv, mv, ev = routing.linearize(models.unroll(model, v), x, labels, jnp.full(6, 0.9))
    return (routing.routed_backward_pair(g_n, bv, mv, ev, s),
            routing.routed_backward(g_n, bv, mv, ev, s),
            routing.routed_backward(g_n, bv, mv, ev, 1 - s))

  (path, complement), alone, alone_complement = jax.jit(routed)(sel)
  for got, want in ((path, alone), (complement, alone_complement)):
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_paired_norms_are_the_norms_of_the_paths_and_their_complements():
  model = NETS["postact"]
  v, x, labels = _setup(model)
  unroll = lambda v: models.unroll(model, v)  # noqa: E731
  sel = routing.sample_selections(np.random.default_rng(0), 6, 2, 4)
  paired = jax.jit(routing.make_path_gradient_fn(unroll, paired=True))(v, x, labels, sel)
  single = jax.jit(routing.make_path_gradient_fn(unroll))(v, x, labels,
                                                          np.concatenate([sel, 1 - sel]))
  for got, want in zip(paired, single):
    assert got.shape == (8,)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("n, samples", [(6, 4), (6, 5), (7, 3)])
def test_paired_selections_give_every_length_its_samples(n, samples):
  selections, lengths = routing.paired_selections(np.random.default_rng(0), n, samples)
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

  for c in routing.one_ahead(dispatched()):
    events.append(f"read {c}")
  assert events == ["dispatch 0", "dispatch 1", "read 0", "dispatch 2", "read 1", "read 2"]
  assert list(routing.one_ahead([])) == []
