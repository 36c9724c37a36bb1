"""A seed stack (config.seeds) trains each run as if alone: same numbers, own workdir, resumable."""

import json

import jax
import numpy as np
import pytest

from resnet_ensemble import checkpoint, stack, train
from resnet_ensemble.writers import read_jsonl
from tests.test_train import _params, _probe

# Effective paths (4 of ResNet-14's 6 blocks): alone, a run skips the blocks gated off; in a
# stack it computes them (the multiply form) and must still land on the same numbers.
GATED = {"model.depth": 14, "gates.sampler": "effective", "gates.k": 4}


def _losses(workdir) -> list[float]:
  return [r["train_loss"] for r in read_jsonl(str(workdir / "metrics.jsonl")) if "train_loss" in r]


def test_a_stack_on_eight_devices_trains_each_seed_as_if_alone(tmp_path, tiny):
  overrides = [f"{k}={json.dumps(v)}" for k, v in GATED.items()]
  final, stacked = _probe(tmp_path, "stack", 8, "seeds=[0,1]", "train.steps_per_call=2",
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
      np.testing.assert_allclose(mine[key], value, rtol=1e-5, atol=1e-6,
                                 err_msg=f"seed {seed} {key}")
    np.testing.assert_allclose(_losses(run_dir), _losses(alone_dir), rtol=1e-5)
    for metric in ("eval_error", "eval_error_unscaled", "eval_loss"):
      assert abs(final[str(seed)][metric] - alone[metric]) <= 1e-5, metric
    written = json.loads((run_dir / "config.json").read_text())
    assert written["seed"] == seed and written["seeds"] == []  # a single run's config
    assert (run_dir / "final_metrics.json").exists()
  assert not (tmp_path / "stack" / "checkpoints").exists()


def test_a_resumed_stack_equals_an_uninterrupted_one(tmp_path, tiny):
  train.train_and_evaluate(tiny(seeds=(3, 5)), str(tmp_path / "straight"))
  stopped = train.train_and_evaluate(tiny(seeds=(3, 5), **{"train.num_steps": 3}),
                                     str(tmp_path / "resumed"))
  assert set(stopped) == {3, 5}
  assert _params(tmp_path / "resumed" / "seed3")[0] == 3
  train.train_and_evaluate(tiny(seeds=(3, 5)), str(tmp_path / "resumed"))
  for seed in (3, 5):
    step_a, leaves_a = _params(tmp_path / "straight" / f"seed{seed}")
    step_b, leaves_b = _params(tmp_path / "resumed" / f"seed{seed}")
    assert step_a == step_b == 6
    for a, b in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(a, b)
  # the two seeds really are different runs
  assert not np.array_equal(_params(tmp_path / "straight" / "seed3")[1][0],
                            _params(tmp_path / "straight" / "seed5")[1][0])


def test_a_stack_whose_runs_stand_at_different_steps_is_refused(tmp_path, tiny):
  run0 = tmp_path / "stack" / "seed0"
  train.train_and_evaluate(tiny(seed=0, **{"train.num_steps": 3}), str(run0))
  with pytest.raises(ValueError, match=r"different steps .*seed0: step 3, .*seed1: no checkpoint"):
    train.train_and_evaluate(tiny(seeds=(0, 1)), str(tmp_path / "stack"))
  assert _params(run0)[0] == 3  # the finished checkpoint is kept


def test_bad_seed_stacks_get_clear_errors(tmp_path, tiny):
  with pytest.raises(ValueError, match="repeat a seed"):
    stack.run_workdirs((1, 1), "w")
  assert stack.run_workdirs((7,), "w") == ["w"]
  with pytest.raises(ValueError, match=r"--mode=lesion on one run: --workdir=w/seed2"):
    stack.check_mode((2, 4), "lesion", "w")
  stack.check_mode((2, 4), "train", "w")
  stack.check_mode((), "lesion", "w")
