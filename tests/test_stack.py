"""A stack of runs (config.seeds, config.stack) trains each run as if alone: same numbers, own
workdir, resumable; runs of different gate samplers too."""

import json
import shutil

import jax
import numpy as np
import pytest

from resnet_ensemble import checkpoint, config as config_lib, stack, train
from resnet_ensemble.writers import read_jsonl
from tests.conftest import run_train_probe, saved_params

# Effective paths (4 of ResNet-14's 6 blocks): alone, a run skips the blocks gated off; in a
# stack it computes them (the multiply form) and must still land on the same numbers.
GATED = {"model.depth": 14, "gates.sampler": "effective", "gates.k": 4}


def _tolerance(key: str) -> dict:
  """How close a stacked run's state must be to the run alone (8 devices and grouped
  convolutions against 1 device: other summation orders). Parameters and BN statistics to float
  rounding. The momentum trace sums raw gradients, and one activation that lands on the other
  side of a ReLU's kink (seen on one CPU model, not another) moves one channel's gradient by
  about 1e-4 while the parameters move by lr times that: the trace gets an absolute bound."""
  return {"rtol": 1e-5, "atol": 1e-3 if "['trace']" in key else 1e-5}


def _losses(workdir) -> list[float]:
  return [r["train_loss"] for r in read_jsonl(str(workdir / "metrics.jsonl")) if "train_loss" in r]


@pytest.mark.slow
def test_a_stack_on_eight_devices_trains_each_seed_as_if_alone(tmp_path, tiny):
  overrides = [f"{k}={json.dumps(v)}" for k, v in GATED.items()]
  final, stacked = run_train_probe(tmp_path, "stack", 8, "seeds=[0,1]", "train.steps_per_call=2",
                          *overrides)
  assert final["devices"] == 8
  for seed in (0, 1):
    alone_dir = tmp_path / f"alone{seed}"
    alone = train.train_and_evaluate(tiny(seed=seed, **GATED), str(alone_dir))
    run_dir = tmp_path / "stack" / f"seed{seed}"
    state = checkpoint.restore_latest(checkpoint.make_manager(str(alone_dir)), None)
    leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
    mine = {k[len(f"seed{seed}"):]: v for k, v in stacked.items() if k.startswith(f"seed{seed}[")}
    assert mine.keys() == leaves.keys() and int(leaves["['step']"]) == 6
    for key, value in leaves.items():
      np.testing.assert_allclose(mine[key], value, **_tolerance(key), err_msg=f"seed {seed} {key}")
    np.testing.assert_allclose(_losses(run_dir), _losses(alone_dir), rtol=1e-5)
    for metric in ("eval_error", "eval_error_unscaled", "eval_loss"):
      assert abs(final[f"seed{seed}"][metric] - alone[metric]) <= 1e-5, metric
    written = json.loads((run_dir / "config.json").read_text())
    assert written["seed"] == seed and written["seeds"] == []  # a single run's config
    assert (run_dir / "final_metrics.json").exists()
  assert not (tmp_path / "stack" / "checkpoints").exists()


def test_a_resumed_stack_equals_an_uninterrupted_one(tmp_path, tiny):
  train.train_and_evaluate(tiny(seeds=(3, 5)), str(tmp_path / "straight"))
  stopped = train.train_and_evaluate(tiny(seeds=(3, 5), **{"train.num_steps": 3}),
                                     str(tmp_path / "resumed"))
  assert set(stopped) == {"seed3", "seed5"}
  assert saved_params(tmp_path / "resumed" / "seed3")[0] == 3
  train.train_and_evaluate(tiny(seeds=(3, 5)), str(tmp_path / "resumed"))
  for seed in (3, 5):
    step_a, leaves_a = saved_params(tmp_path / "straight" / f"seed{seed}")
    step_b, leaves_b = saved_params(tmp_path / "resumed" / f"seed{seed}")
    assert step_a == step_b == 6
    for a, b in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(a, b)
  # the two seeds really are different runs
  assert not np.array_equal(saved_params(tmp_path / "straight" / "seed3")[1][0],
                            saved_params(tmp_path / "straight" / "seed5")[1][0])


# Three samplers in one stack (ResNet-14: 6 blocks, 2 downsampling): none, effective paths
# (4 of 6), stochastic depth per example with every block droppable; different seeds.
MIXED = ("full:seed=1", "paths:gates.sampler=effective,gates.k=4",
         "sd:seed=2,gates.sampler=stochastic_depth,gates.per_example=true,"
         "gates.keep_downsampling=false")


def _keys(workdir) -> list[list[str]]:
  """The keys of each row of a run's metrics.jsonl."""
  return [sorted(r) for r in read_jsonl(str(workdir / "metrics.jsonl"))]


@pytest.mark.slow
def test_a_mixed_stack_on_eight_devices_trains_each_run_as_if_alone(tmp_path, tiny):
  shared = {"model.depth": 14, "train.steps_per_call": 2}
  final, stacked = run_train_probe(tmp_path, "stack", 8, f"stack={json.dumps(MIXED)}",
                          *(f"{k}={json.dumps(v)}" for k, v in shared.items()))
  assert final["devices"] == 8
  for run in stack.runs_of(tiny(stack=MIXED, **shared)):
    alone_dir, run_dir = tmp_path / f"alone_{run.name}", tmp_path / "stack" / run.name
    run.config.gates.skip_compute = False  # alone, the multiply form too
    alone = train.train_and_evaluate(run.config, str(alone_dir))
    state = checkpoint.restore_latest(checkpoint.make_manager(str(alone_dir)), None)
    leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
    mine = {k[len(run.name):]: v for k, v in stacked.items() if k.startswith(f"{run.name}[")}
    assert mine.keys() == leaves.keys() and int(leaves["['step']"]) == 6
    for key, value in leaves.items():
      np.testing.assert_allclose(mine[key], value, **_tolerance(key), err_msg=f"{run.name} {key}")
    np.testing.assert_allclose(_losses(run_dir), _losses(alone_dir), rtol=1e-5)
    # the same metrics as alone: a run without a sampler has no unscaled network
    assert final[run.name].keys() == alone.keys()
    assert ("eval_error_unscaled" in alone) == (run.name != "full")
    for metric, value in alone.items():
      assert abs(final[run.name][metric] - value) <= 1e-5, (run.name, metric)
    assert _keys(run_dir) == _keys(alone_dir)
    written = json.loads((run_dir / "config.json").read_text())
    lone = json.loads((alone_dir / "config.json").read_text())
    assert written == dict(lone, gates=dict(lone["gates"], skip_compute=True))
    assert written["stack"] == [] and written["seed"] == run.config.seed
  assert not (tmp_path / "stack" / "checkpoints").exists()


# ResNet-8 (3 blocks, 2 downsampling): effective paths keep 2 of the 3, any of them;
# stochastic depth per example evaluated unscaled (no expected-gate network).
SMALL = ("a:seed=3", "e:seed=3,gates.sampler=effective,gates.k=2,gates.keep_downsampling=false",
         "sd:seed=5,gates.sampler=stochastic_depth,gates.per_example=true,"
         "gates.test_scaling=none")


def test_a_resumed_mixed_stack_equals_an_uninterrupted_one_and_each_run_resumes_alone(
    tmp_path, tiny):
  straight = train.train_and_evaluate(tiny(stack=SMALL), str(tmp_path / "straight"))
  assert [("eval_error_unscaled" in straight[n]) for n in ("a", "e", "sd")] == [False, True, False]
  train.train_and_evaluate(tiny(stack=SMALL, **{"train.num_steps": 3}), str(tmp_path / "resumed"))
  shutil.copytree(tmp_path / "resumed", tmp_path / "alone")
  train.train_and_evaluate(tiny(stack=SMALL), str(tmp_path / "resumed"))
  for name in ("a", "e", "sd"):
    step_a, leaves_a = saved_params(tmp_path / "straight" / name)
    step_b, leaves_b = saved_params(tmp_path / "resumed" / name)
    assert step_a == step_b == 6
    for a, b in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(a, b)
  # the runs really are different runs
  assert not np.array_equal(saved_params(tmp_path / "straight" / "a")[1][0],
                            saved_params(tmp_path / "straight" / "e")[1][0])
  # A run's workdir resumes alone from its own config.json (configs/run.py reads it).
  run = config_lib.from_workdir(str(tmp_path / "alone" / "sd"))
  assert (run.seed, run.gates.per_example, run.train.num_steps) == (5, True, 3)
  run.train.num_steps = 6
  train.train_and_evaluate(run, str(tmp_path / "alone" / "sd"))
  step, leaves = saved_params(tmp_path / "alone" / "sd")
  assert step == 6
  for a, b in zip(leaves, saved_params(tmp_path / "straight" / "sd")[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_stack_whose_runs_stand_at_different_steps_is_refused(tmp_path, tiny):
  run0 = tmp_path / "stack" / "seed0"
  train.train_and_evaluate(tiny(seed=0, **{"train.num_steps": 3}), str(run0))
  with pytest.raises(ValueError, match=r"different steps .*seed0: step 3, .*seed1: no checkpoint"):
    train.train_and_evaluate(tiny(seeds=(0, 1)), str(tmp_path / "stack"))
  assert saved_params(run0)[0] == 3  # the finished checkpoint is kept


def test_a_stack_names_its_runs_and_their_own_configs(tiny):
  runs = stack.runs_of(tiny(seed=4, stack=(
      "full", "e8:seed=1, gates.sampler=effective,gates.k=2,gates.keep_downsampling=false",
      "sd:gates.sampler=stochastic_depth,gates.per_example=True,gates.p_last=0.25")))
  assert [r.name for r in runs] == ["full", "e8", "sd"]
  assert [r.workdir("w") for r in runs] == ["w/full", "w/e8", "w/sd"]
  assert [r.config.seed for r in runs] == [4, 1, 4]
  e8, sd = runs[1].config.gates, runs[2].config.gates
  assert (e8.sampler, e8.k, e8.keep_downsampling) == ("effective", 2, False)
  assert (sd.sampler, sd.per_example, sd.p_last) == ("stochastic_depth", True, 0.25)
  assert runs[0].config.gates.to_dict() == tiny().gates.to_dict()
  assert all(r.config.stack == () and r.config.seeds == () for r in runs)  # single-run configs
  # config.seeds: the runs that differ only in seed
  by_seed = stack.runs_of(tiny(seeds=(3, 5)))
  assert [(r.name, r.config.seed, r.workdir("w")) for r in by_seed] == [
      ("seed3", 3, "w/seed3"), ("seed5", 5, "w/seed5")]
  assert [(r.config.seed, r.workdir("w")) for r in stack.runs_of(tiny(seeds=(7,)))] == [(7, "w")]
  assert [(r.config.seed, r.workdir("w")) for r in stack.runs_of(tiny(seed=2))] == [(2, "w")]


@pytest.mark.parametrize("entries, message", [
    (("a", "deep:model.depth=20"), r"'deep:model.depth=20': model.depth is shared by the runs "
     r"of a stack .*only seed and gates.\*.*--config.model.depth"),
    (("a:seed=1", "a:seed=2"), "the run name 'a' repeats"),
    (("a:gates.q=1",), r"'a:gates.q=1': unknown field gates.q"),
    (("a:gates.k=many",), r"'a:gates.k=many': gates.k='many' is not an int"),
    (("a:gates.per_example=maybe",), r"gates.per_example='maybe' is not a bool"),
    (("a:seed",), r"'a:seed': expected KEY=VALUE"),
    (("a:seed=1,seed=2",), "'a:seed=1,seed=2': seed is set twice"),
    (("../up:seed=1",), r"'../up:seed=1': the run name '../up' must be"),
    ((":seed=1",), r"the run name '' must be"),
    (("a:seed=-1",), r"seed.*>= 0"),
    (("a", "b"), r"runs 'a' and 'b' are the same run"),
])
def test_bad_stacks_get_clear_errors(tiny, entries, message):
  with pytest.raises(ValueError, match=message):
    stack.runs_of(tiny(stack=entries))


def test_a_bad_stack_is_refused_before_anything_is_written(tmp_path, tiny):
  with pytest.raises(ValueError, match="--config.seeds and --config.stack"):
    stack.runs_of(tiny(seeds=(1, 2), stack=("a",)))
  with pytest.raises(ValueError, match="repeat a seed"):
    stack.runs_of(tiny(seeds=(1, 1)))
  with pytest.raises(ValueError, match=r"model.depth is shared"):
    train.train_and_evaluate(tiny(stack=("a", "b:model.depth=14")), str(tmp_path / "w"))
  with pytest.raises(ValueError, match=r"gates.k=9 must be between 1 and the number of blocks"):
    train.train_and_evaluate(tiny(stack=("a", "b:gates.sampler=effective,gates.k=9")),
                             str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  with pytest.raises(ValueError, match=r"--mode=lesion on one run: --workdir=w/e8 "):
    stack.check_mode(tiny(stack=("e8:gates.sampler=effective", "b")), "lesion", "w")
  with pytest.raises(ValueError, match=r"--mode=lesion on one run: --workdir=w/seed2"):
    stack.check_mode(tiny(seeds=(2, 4)), "lesion", "w")
  stack.check_mode(tiny(seeds=(2, 4)), "train", "w")
  stack.check_mode(tiny(), "lesion", "w")
