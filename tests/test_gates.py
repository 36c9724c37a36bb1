"""Gate samplers (E8 effective paths, E10 stochastic depth): statistics, determinism, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_ensemble import checkpoint, gates, train
from resnet_ensemble.config import base_config
from resnet_ensemble.layout import BlockLayout
from resnet_ensemble.writers import read_jsonl

R110 = BlockLayout((18, 18, 18), (False, True, True))


def _gc(**kw):
  c = base_config().gates
  c.update(kw)
  return c


def _draw(sampler, steps, seed=0):
  key = jax.random.key(seed)
  return np.asarray(jax.jit(jax.vmap(lambda t: sampler(jax.random.fold_in(key, t))))(
      jnp.arange(steps)))


def _binomial_ok(freq, p, steps):
  return np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / steps) + 1e-9)


def test_effective_paths_keep_exactly_k_blocks_with_uniform_frequency():
  steps = 4000
  g = _draw(gates.make_sampler(_gc(sampler="effective", k=23), R110, 128), steps)
  assert g.shape == (steps, 54) and (g.sum(1) == 23).all()
  assert (g[:, [18, 36]] == 1).all()  # downsampling blocks always active
  others = np.setdiff1d(np.arange(54), [18, 36])
  assert _binomial_ok(g[:, others].mean(0), 21 / 52, steps)
  free = _draw(gates.make_sampler(_gc(sampler="effective", k=23, keep_downsampling=False),
                                  R110, 128), steps)
  assert (free.sum(1) == 23).all() and _binomial_ok(free.mean(0), 23 / 54, steps)


def test_stochastic_depth_survival_decays_linearly_to_p_last():
  steps = 4000
  p = gates.survival_probabilities(R110, 0.5, keep_downsampling=False)
  assert p[0] == pytest.approx(1 - 0.5 / 54) and p[-1] == pytest.approx(0.5)
  g = _draw(gates.make_sampler(_gc(sampler="stochastic_depth", keep_downsampling=False),
                               R110, 128), steps)
  assert set(np.unique(g)) <= {0.0, 1.0} and _binomial_ok(g.mean(0), p, steps)
  per_example = gates.make_sampler(
      _gc(sampler="stochastic_depth", per_example=True, keep_downsampling=False), R110, 16)
  g = _draw(per_example, 200)
  assert g.shape == (200, 54, 16) and _binomial_ok(g.mean((0, 2)), p, 200 * 16)
  kept = gates.make_sampler(_gc(sampler="stochastic_depth", keep_downsampling=True), R110, 8)
  assert (_draw(kept, 500)[:, [18, 36]] == 1).all()


def test_same_seed_same_gates():
  sampler = gates.make_sampler(_gc(sampler="effective", k=10), R110, 8)
  np.testing.assert_array_equal(_draw(sampler, 50, seed=3), _draw(sampler, 50, seed=3))
  assert not np.array_equal(_draw(sampler, 50, seed=3), _draw(sampler, 50, seed=4))


def test_a_stack_sampler_draws_each_runs_own_gates_exactly():
  """Runs of different samplers in one vmapped program: run r's gates at every step are those
  its own sampler draws alone from the same key (per-batch gates broadcast over the batch)."""
  configs = [_gc(), _gc(sampler="effective", k=23), _gc(sampler="effective", k=9),
             _gc(sampler="stochastic_depth", per_example=True, keep_downsampling=False),
             _gc(sampler="stochastic_depth", p_last=0.2)]
  sample = gates.make_stack_sampler(configs, R110, 8)
  keys = jax.random.split(jax.random.key(7), len(configs))
  for t in range(3):
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, t)
    drawn = np.asarray(jax.jit(jax.vmap(sample))(step_keys, jnp.arange(len(configs))))
    assert drawn.shape == (len(configs), 54, 8)
    for r, gc in enumerate(configs):
      alone = gates.make_sampler(gc, R110, 8)
      want = np.ones((54, 8)) if alone is None else np.asarray(alone(step_keys[r]))
      np.testing.assert_array_equal(drawn[r], np.broadcast_to(want.reshape(54, -1), (54, 8)))
  assert gates.make_stack_sampler([_gc(), _gc(test_scaling="none")], R110, 8) is None
  # runs that sample alike share one sampler: their gates keep the shape they have alone
  same = gates.make_stack_sampler([_gc(sampler="effective", k=5)] * 2, R110, 8)
  assert jax.vmap(same)(keys[:2], jnp.arange(2)).shape == (2, 54)
  per_batch = gates.make_stack_sampler([_gc(), _gc(sampler="effective", k=5)], R110, 8)
  drawn = np.asarray(jax.vmap(per_batch)(keys[:2], jnp.arange(2)))
  assert drawn.shape == (2, 54) and (drawn[0] == 1).all() and drawn[1].sum() == 5


def test_test_time_gates_are_the_expected_gates():
  eff = gates.eval_gates(_gc(sampler="effective", k=23), R110)
  assert eff[18] == eff[36] == 1 and eff[0] == pytest.approx(21 / 52)
  assert eff.sum() == pytest.approx(23)  # the expected number of active blocks is k
  sd = gates.eval_gates(_gc(sampler="stochastic_depth", keep_downsampling=False), R110)
  np.testing.assert_allclose(sd, 1 - np.arange(1, 55) / 54 * 0.5, rtol=1e-6)
  assert gates.eval_gates(_gc(sampler="effective", test_scaling="none"), R110) is None
  assert gates.eval_gates(_gc(), R110) is None


@pytest.mark.parametrize("kw, message", [
    (dict(sampler="effective", k=0), "gates.k=0 must be between 1 and the number of blocks"),
    (dict(sampler="effective", k=55), "gates.k=55 must be between 1"),
    (dict(sampler="effective", k=1), "smaller than the 2 downsampling blocks"),
    (dict(sampler="stochastic_depth", p_last=0.0), r"p_last=0.0 must be in \(0, 1\]"),
    (dict(sampler="stochastic_depth", p_last=1.5), r"p_last=1.5 must be in \(0, 1\]"),
    (dict(sampler="dropout"), "unknown gate sampler 'dropout'"),
])
def test_bad_gate_configs_are_clear_errors(kw, message):
  with pytest.raises(ValueError, match=message):
    gates.make_sampler(_gc(**kw), R110, 8)


@pytest.mark.parametrize("sampler", ["effective", "stochastic_depth"])
def test_gated_training_learns_resumes_and_compiles_once(tmp_path, tiny, sampler):
  over = {"model.depth": 20, "gates.sampler": sampler, "gates.k": 5, "train.num_steps": 30,
          "train.log_every": 10, "train.eval_every": 30, "train.steps_per_call": 5,
          "optim.boundaries": (), "optim.warmup_steps": 0, "checkpoint.every": 10}
  final = train.train_and_evaluate(tiny(**over), str(tmp_path / "a"))
  history = [r for r in read_jsonl(str(tmp_path / "a" / "metrics.jsonl")) if "train_loss" in r]
  assert history[-1]["train_loss"] < history[0]["train_loss"]
  assert "eval_error_unscaled" in final and "eval_error" in final
  compiles = [r for r in read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
              if any(k.startswith("compile_s") for k in r)]
  assert len(compiles) == 1  # 6 calls of 5 steps: one compiled program
  # Stopped at step 10 and resumed: the same gate sequence, hence the same parameters.
  train.train_and_evaluate(tiny(**{**over, "train.num_steps": 10}), str(tmp_path / "b"))
  train.train_and_evaluate(tiny(**over), str(tmp_path / "b"))
  restore = lambda d: jax.tree.leaves(checkpoint.restore_latest(
      checkpoint.make_manager(str(d)), None))
  for x, y in zip(restore(tmp_path / "a"), restore(tmp_path / "b")):
    np.testing.assert_array_equal(x, y)
