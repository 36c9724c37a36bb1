"""Training behaves: same numbers on 1 and 8 devices, resume == uninterrupted, loss goes down."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_ensemble import augment, optim, state as state_lib, train
from resnet_ensemble.workdir import ConfigMismatchError
from resnet_ensemble.config import base_config
from resnet_ensemble.writers import read_jsonl
from tests.conftest import run_train_probe, saved_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_training(tmp_path):
  one, params_one = run_train_probe(tmp_path, "one", 1, "train.steps_per_call=2")
  eight, params_eight = run_train_probe(tmp_path, "eight", 8, "train.steps_per_call=2")
  assert one["devices"] == 1 and eight["devices"] == 8
  assert params_one.keys() == params_eight.keys()
  for key in params_one:
    np.testing.assert_allclose(params_one[key], params_eight[key], rtol=1e-5, atol=1e-5,
                               err_msg=key)
  for metric in ("eval_loss", "eval_accuracy"):
    assert abs(one[metric] - eight[metric]) <= 1e-5
  history_one = read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
  history_eight = read_jsonl(str(tmp_path / "eight" / "metrics.jsonl"))
  losses = lambda h: [r["train_loss"] for r in h if "train_loss" in r]
  np.testing.assert_allclose(losses(history_one), losses(history_eight), rtol=1e-5, atol=1e-5)


def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny):
  train.train_and_evaluate(tiny(), str(tmp_path / "straight"))
  train.train_and_evaluate(tiny(**{"train.num_steps": 3}), str(tmp_path / "resumed"))
  assert saved_params(tmp_path / "resumed")[0] == 3
  train.train_and_evaluate(tiny(), str(tmp_path / "resumed"))
  step_a, leaves_a = saved_params(tmp_path / "straight")
  step_b, leaves_b = saved_params(tmp_path / "resumed")
  assert step_a == step_b == 6
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)


def test_training_reduces_the_loss_and_writes_the_workdir(tmp_path, tiny):
  workdir = tmp_path / "w"
  final = train.train_and_evaluate(
      tiny(**{"model.width": 8, "train.num_steps": 60, "train.log_every": 20,
              "train.eval_every": 60, "train.steps_per_call": 5, "optim.boundaries": (),
              "optim.warmup_steps": 0}), str(workdir))
  history = [r for r in read_jsonl(str(workdir / "metrics.jsonl")) if "train_loss" in r]
  assert history[-1]["train_loss"] < 0.75 * history[0]["train_loss"]
  assert final["eval_accuracy"] > 0.3  # chance is 0.1
  assert (workdir / "config.json").exists() and (workdir / "final_metrics.json").exists()
  assert "60" in os.listdir(workdir / "checkpoints")


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, tiny):
  with pytest.raises(FloatingPointError, match="non-finite training loss .* at step 2"):
    train.train_and_evaluate(tiny(**{"optim.learning_rate": 1e30, "optim.warmup_steps": 0}),
                             str(tmp_path / "nan"))


def test_every_runs_metric_writer_is_closed_when_training_ends(tmp_path, tiny, monkeypatch):
  from resnet_ensemble import writers
  made, create = [], writers.create_writer
  monkeypatch.setattr(writers, "create_writer", lambda *a, **k: made.append(create(*a, **k))
                      or made[-1])
  files = lambda: [w for m in made for w in m.writers if isinstance(w, writers.JsonlWriter)]
  train.train_and_evaluate(tiny(seeds=(0, 1)), str(tmp_path / "stack"))
  assert len(files()) == 2 and all(f._file.closed for f in files())
  for run in ("seed0", "seed1"):  # complete: every log and eval row, the last at the end
    rows = read_jsonl(str(tmp_path / "stack" / run / "metrics.jsonl"))
    assert [r["step"] for r in rows if "train_loss" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "eval_error" in r] == [3, 6]
  made.clear()  # a run that stops on an error closes its writer too
  with pytest.raises(FloatingPointError):
    train.train_and_evaluate(tiny(**{"optim.learning_rate": 1e30, "optim.warmup_steps": 0}),
                             str(tmp_path / "nan"))
  assert len(files()) == 1 and files()[0]._file.closed


def test_a_workdir_refuses_another_model(tmp_path, tiny):
  train.train_and_evaluate(tiny(**{"train.num_steps": 2}), str(tmp_path / "w"))
  with pytest.raises(ConfigMismatchError, match="model.depth: workdir has 8"):
    train.train_and_evaluate(tiny(**{"model.depth": 14}), str(tmp_path / "w"))


def test_paper_learning_rate_schedule():
  c = base_config().optim
  schedule = optim.learning_rate_schedule(c, 64_000)
  for step, lr in [(0, 0.01), (399, 0.01), (400, 0.1), (31_999, 0.1), (32_000, 0.01),
                   (48_000, 0.001), (63_999, 0.001)]:
    assert float(schedule(step)) == pytest.approx(lr), step
  c.schedule, c.warmup, c.warmup_steps, c.warmup_learning_rate = "cosine", "linear", 10, 0.0
  schedule = optim.learning_rate_schedule(c, 110)
  assert float(schedule(5)) == pytest.approx(0.05)
  assert float(schedule(60)) == pytest.approx(0.05, abs=1e-6)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)


def test_batches_are_epoch_permutations_and_augmentation_is_a_crop():
  key = jax.random.key(0)
  seen = np.concatenate([np.asarray(augment.batch_indices(key, jnp.asarray(s), 100, 20))
                         for s in range(5)])
  assert sorted(seen) == list(range(100))  # one epoch = every example once
  nxt = np.asarray(augment.batch_indices(key, jnp.asarray(5), 100, 20))
  assert not np.array_equal(nxt, seen[:20])  # a fresh permutation next epoch
  images = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.uint8).reshape(2, 4, 4, 1) + 1
  out = np.asarray(augment.random_crop_flip(jax.random.key(3), images, 1, flip=True))
  for b in range(2):
    nonzero = out[b][out[b] > 0]
    assert set(nonzero.tolist()) <= set(np.asarray(images[b]).ravel().tolist())
    assert len(nonzero) >= 9  # a crop shifted by at most 1 pixel keeps a 3x3 core


LESION = ("model.depth=14", "lesion.max_k=2", "lesion.draws=3", "lesion.reorder_max_swaps=2",
          "lesion.reorder_draws=2", "lesion.chunk=4")


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_as_many_devices(tmp_path):
  """2 processes x 2 CPU devices, joined by jax.distributed on localhost == 1 x 4 devices,
  for training and for a lesion sweep split across the processes."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid), PROBE_LESION="1", XLA_FLAGS=(
                   "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "_train_probe.py"), str(tmp_path / "multi"),
         str(tmp_path / "multi.npz"), "train.steps_per_call=2", *LESION],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  multi = json.loads(outs[0][0].strip().splitlines()[-1])
  assert multi["processes"] == 2 and multi["devices"] == 4
  single, _ = run_train_probe(tmp_path, "single", 4, "train.steps_per_call=2", *LESION, PROBE_LESION="1")
  for metric in ("eval_loss", "eval_accuracy"):
    assert abs(single[metric] - multi[metric]) <= 1e-5
  history = lambda d: [(r["train_loss"], r["param_norm"]) for r in
                       read_jsonl(str(tmp_path / d / "metrics.jsonl")) if "train_loss" in r]
  np.testing.assert_allclose(history("multi"), history("single"), rtol=1e-5, atol=1e-5)
  lesions = [json.loads((tmp_path / d / "lesion.json").read_text()) for d in ("multi", "single")]
  for key in ("single", "random", "reorder"):
    np.testing.assert_allclose(lesions[0][key]["error"], lesions[1][key]["error"], atol=1e-6)


def test_a_corrupt_newest_checkpoint_is_skipped_and_kept(tmp_path, tiny):
  straight = tmp_path / "straight"
  train.train_and_evaluate(tiny(), str(straight))
  workdir = tmp_path / "w"
  train.train_and_evaluate(tiny(), str(workdir))  # checkpoints at steps 3 and 6
  # Damage the newest checkpoint (step 6): truncate every file it holds.
  for root, _, files in os.walk(workdir / "checkpoints" / "6"):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(7)
  train.train_and_evaluate(tiny(), str(workdir))  # resumes from 3, trains 3 -> 6 again
  names = os.listdir(workdir / "checkpoints")
  assert "6.unreadable-0" in names and "6" in names and "3" in names  # nothing deleted
  _, leaves_a = saved_params(straight)
  step_b, leaves_b = saved_params(workdir)
  assert step_b == 6
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_checkpoints_and_a_restart_finishes_like_an_uninterrupted_run(tmp_path):
  """What a preempted spot VM sees: SIGTERM mid-run, then the same command again."""
  import signal
  import time
  args = ("train.num_steps=400", "train.log_every=2", "train.eval_every=400",
          "checkpoint.every=400")
  _, uninterrupted = run_train_probe(tmp_path, "straight", 1, *args)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
  cmd = [sys.executable, os.path.join(REPO, "tests", "_train_probe.py"), str(tmp_path / "pre"),
         str(tmp_path / "pre.npz"), *args]
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "pre" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (
      metrics.exists() and sum("train_loss" in line for line in metrics.read_text().splitlines()) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM: not a finished run
  stopped = json.loads(out.strip().splitlines()[-1])["stopped_at"]
  assert 0 < stopped < 400
  _, resumed = run_train_probe(tmp_path, "pre", 1, *args)
  for key in uninterrupted:
    np.testing.assert_array_equal(uninterrupted[key], resumed[key], err_msg=key)


def test_the_initial_state_is_computed_on_the_host_and_replicated():
  from resnet_ensemble import models
  from resnet_ensemble.sharding import make_mesh, replicated
  c = base_config()
  c.model.depth, c.model.width = 8, 4
  model = models.build(c.model, 10)
  tx, _ = optim.make_optimizer(c.optim, 10)
  mesh = make_mesh()
  state = state_lib.create_train_state(model, tx, 3, (8, 8, 3), mesh)
  direct = state_lib.create_train_state_unsharded(model, tx, 3, (8, 8, 3))  # op by op, no jit
  for placed, expected in zip(jax.tree.leaves(state), jax.tree.leaves(direct)):
    assert placed.sharding == replicated(mesh)
    np.testing.assert_allclose(np.asarray(placed), np.asarray(expected), rtol=1e-6, atol=1e-7)
