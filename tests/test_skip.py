"""skip_compute: a block gated off for the whole batch is not computed, and nothing else changes.

Same loss, output, gradients and BN statistics as the multiply form; in both, the gated-off
blocks' residual-branch BN statistics stay put (Huang et al.'s dropped block) while a shortcut
that runs moves its own; the skipped branch holds no convolution and is the one that runs; a
mostly-skipped network is measurably faster.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_ensemble import blocks, gates as gates_lib, models, state as state_lib, train
from resnet_ensemble.config import base_config
from resnet_ensemble.layout import down_name, stacked_name
from resnet_ensemble.sharding import make_mesh, replicated
from tests.conftest import RESNETS

MODELS = {**RESNETS, "plain": models.PlainNet(stage_sizes=(3, 2), width=8)}
# Block 2 (a downsampling block) off, block 4 (downsampling) on; then all off, all on.
FIXED_GATES = ([1, 0, 0, 1, 1, 0], [0] * 6, [1] * 6)


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(42), (6, 8, 8, 3))


def _variables(model, x):
  """Initialised variables with non-trivial batch statistics."""
  v = jax.jit(model.init)(jax.random.key(0), x)
  _, mut = jax.jit(lambda v: model.apply(v, x * 2 + 0.5, train=True, mutable=["batch_stats"]))(v)
  return {"params": v["params"], "batch_stats": mut["batch_stats"]}


def _step_fn(model):
  """(loss, logits, grads, new batch_stats) of one training-mode pass."""

  def step(variables, x, gates, skip):
    def loss_fn(params):
      logits, mut = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                gates=gates, train=True, skip_compute=skip,
                                mutable=["batch_stats"])
      weights = jnp.linspace(-1.0, 1.0, logits.size).reshape(logits.shape)
      return jnp.sum(weights * logits) + 0.1 * jnp.sum(logits ** 2), (logits, mut)

    (loss, (logits, mut)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    return loss, logits, grads, mut["batch_stats"]

  return step


def _make_step(model):
  return jax.jit(_step_fn(model), static_argnums=3)


def _block(tree: dict, layout, i: int) -> dict:
  """Block i's subtree (its slice of the stacked axis for a scanned block)."""
  s = layout.stage_of(i)
  r = layout.stacked_range(s)
  if i in r:
    return jax.tree.map(lambda a: a[i - r.start], tree[stacked_name(s)])
  return tree[down_name(s)]


def _shortcut_modules(model, i: int) -> set[str]:
  """Submodules a skipped block still computes: a projection shortcut (and, pre-activation,
  the BN-ReLU it shares with f)."""
  if not isinstance(model, models.ResNet) or i not in model.layout.downsampling:
    return set()
  if model.shortcut == "zero_pad":
    return set()
  return {"proj_conv", "bn1"} if model.preact else {"proj_conv", "proj_bn"}


def _close(a, b):
  """Equal to f32 rounding: 1e-6 relative, or 1e-6 of the tree's largest entry (a gradient
  summed with cancellation is exact only up to its summands' scale)."""
  scale = max([1.0] + [float(np.max(np.abs(u))) for u in jax.tree.leaves(b)])
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("kind", list(MODELS))
def test_skip_equals_multiply_form_and_both_freeze_gated_off_statistics(kind, x):
  model = MODELS[kind]
  layout = model.layout
  n = layout.n_blocks
  v = _variables(model, x)
  step = _make_step(model)
  rng = np.random.default_rng(0)
  draws = [g[:n] for g in FIXED_GATES] + [rng.integers(0, 2, n) for _ in range(3)]
  for g in draws:
    g = jnp.asarray(g, jnp.float32)
    loss0, logits0, grads0, stats0 = step(v, x, g, False)
    loss1, logits1, grads1, stats1 = step(v, x, g, True)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    _close(logits1, logits0)
    _close(grads1, grads0)
    for i in range(n):
      old, mul, skp = (_block(t, layout, i) for t in (v["batch_stats"], stats0, stats1))
      if g[i]:
        _close(skp, mul)
        continue
      keep = _shortcut_modules(model, i)
      for name in _block(grads1, layout, i):
        residual_grads = [_block(gr, layout, i)[name] for gr in (grads0, grads1)]
        if name not in keep:  # f's parameters: zero gradient in both forms
          assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(residual_grads)), name
      for name in old:
        if name in keep:  # the shortcut ran: its BN statistics move, in both forms alike
          _close(skp[name], mul[name])
          assert not np.allclose(jax.tree.leaves(skp[name])[0],
                                 jax.tree.leaves(old[name])[0]), (i, name)
        else:  # f did not count: unchanged in both forms
          for a, b, c in zip(*(jax.tree.leaves(t[name]) for t in (skp, old, mul))):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(c, b)


def test_per_example_gates_skip_only_rows_zero_for_the_whole_batch(x):
  model = MODELS["preact"]
  v = _variables(model, x)
  step = _make_step(model)
  g = np.ones((6, x.shape[0]), np.float32)
  g[1] = 0                 # off for every example: skipped
  g[3, ::2] = 0            # off for some examples: computed, multiplied
  g[2] = 0                 # a downsampling block off for the whole batch
  g = jnp.asarray(g)
  loss0, logits0, grads0, stats0 = step(v, x, g, False)
  loss1, logits1, grads1, stats1 = step(v, x, g, True)
  _close((loss1, logits1, grads1), (loss0, logits0, grads0))
  layout = model.layout
  _close(_block(stats1, layout, 3), _block(stats0, layout, 3))
  for name, stats in _block(stats1, layout, 1).items():
    _close(stats, _block(v["batch_stats"], layout, 1)[name])
    _close(_block(stats0, layout, 1)[name], stats)  # the multiply form keeps them too


def test_vmapped_gates_with_skip_compute_still_evaluate_each_variant(x):
  """Under vmap the cond is a select (both branches run): same numbers, as the lesion study
  (which keeps the multiply form) would get."""
  model = MODELS["preact"]
  v = _variables(model, x)
  variants = jnp.asarray(np.random.default_rng(1).integers(0, 2, (4, 6)), jnp.float32)
  ev = lambda skip: jax.jit(jax.vmap(lambda g: model.apply(v, x, gates=g, skip_compute=skip)))(
      variants)
  _close(ev(True), ev(False))


def _count_convs(jaxpr) -> int:
  return sum((e.primitive.name == "conv_general_dilated") + sum(
      _count_convs(sub) for sub in _subjaxprs(e)) for e in jaxpr.eqns)


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(getattr(item, "jaxpr", None), "eqns"):
        yield item.jaxpr


def _cond_branch_convs(jaxpr):
  """Per cond in ``jaxpr`` (nested ones included): the convolution count of each branch."""
  for e in jaxpr.eqns:
    if e.primitive.name == "cond":
      yield tuple(_count_convs(b.jaxpr) for b in e.params["branches"])
    for sub in _subjaxprs(e):
      yield from _cond_branch_convs(sub)


def test_skipped_branch_holds_no_convolution_forward_or_backward(x):
  model = MODELS["zero_pad"]
  v = _variables(model, x)
  step = lambda p, g: _step_fn(model)({"params": p, "batch_stats": v["batch_stats"]}, x, g, True)
  jaxpr = jax.make_jaxpr(step)(v["params"], jnp.ones((6,)))
  counts = list(_cond_branch_convs(jaxpr.jaxpr))
  # Forward: one cond per downsampling block and per stage's scan body; backward: as many.
  assert len(counts) >= 2 * 5, counts
  # lax.cond's branches are (false: computed, true: skipped); the skipped one has no conv.
  assert all(skipped == 0 and computed >= 2 for computed, skipped in counts), counts


def test_only_the_taken_branch_runs(x, monkeypatch):
  """Each block's cond runs one branch: counted by callbacks inside the branches."""
  model = MODELS["preact"]
  v = _variables(model, x)
  runs = collections.Counter()

  def counted(fn, what):
    def branch(block, y, gate):
      jax.debug.callback(lambda: runs.update([what]))
      return fn(block, y, gate)
    return branch

  monkeypatch.setattr(blocks, "_computed", counted(blocks._computed, "computed"))
  monkeypatch.setattr(blocks, "_skipped", counted(blocks._skipped, "skipped"))
  step = _make_step(model)
  for g in ([1, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]):
    runs.clear()
    jax.block_until_ready(step(v, x, jnp.asarray(g, jnp.float32), True))
    jax.effects_barrier()
    assert (runs["computed"], runs["skipped"]) == (sum(g), 6 - sum(g)), (g, runs)


# How much faster a skipped block makes a step is a speed question, measured in bench/
# (run_all.sh steps train_effective vs train_effective_multiply), not timed here: the two tests
# above show the skipped branch holds no convolution and only the taken branch runs.


def test_training_with_skip_follows_the_multiply_trajectory_and_compiles_once():
  """make_train_on_batch with an effective-path sampler: the same parameters and BN
  statistics step by step (the two forms leave the same state), the loss falls, one
  compilation for every step."""
  model = models.ResNet(stage_sizes=(3, 3, 3), widths=(4, 8, 16))
  gc = base_config().gates
  gc.sampler, gc.k = "effective", 4
  sampler = gates_lib.make_stack_sampler([gc], model.layout, 16)
  tx = optax.sgd(0.1, momentum=0.9)
  mesh = make_mesh()
  images = jax.random.randint(jax.random.key(1), (16, 8, 8, 3), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(16) % 10
  state0 = state_lib.create_train_state(model, tx, 0, (8, 8, 3), mesh)
  runs = {}
  for skip in (False, True):
    step = jax.jit(train.make_train_on_batch(model, tx, (128.0,) * 3, (64.0,) * 3, 0.0, mesh,
                                             sample_gates=sampler,
                                             skip_compute=skip),
                   out_shardings=(replicated(mesh),) * 2)
    state, losses = state0, []
    for _ in range(20):
      state, m = step(state, images, labels, jax.random.key(3))
      losses.append(float(m.compute()["loss"]))
    assert step._cache_size() == 1
    runs[skip] = state, losses
  (s0, l0), (s1, l1) = runs[False], runs[True]
  assert np.mean(l1[-3:]) < 0.7 * np.mean(l1[:3]), l1
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s0.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
