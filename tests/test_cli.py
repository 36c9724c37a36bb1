"""The command line: the quickstart end to end, and clear errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=600, fast_compile=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if not fast_compile:  # long runs: optimised code pays for its longer compile
    env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "resnet_ensemble", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_quickstart_trains_well_above_chance(tmp_path):
  workdir = tmp_path / "quickstart"
  proc = cli("--config=configs/quickstart.py", f"--workdir={workdir}", fast_compile=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["eval_accuracy"] > 0.8, final  # 10 classes: chance is 0.1
  assert "ETA" in proc.stdout
  assert (workdir / "metrics.jsonl").exists() and (workdir / "checkpoints").is_dir()


@pytest.mark.parametrize("override, message", [
    ("--config.train.batchsize=3", "batchsize"),
    ("--config.model.name=resnet", "unknown model name 'resnet'"),
    ("--config.data.name=mnist", "mnist"),
    ("--config.model.depth=100", "6n+2"),
])
def test_bad_config_is_a_clear_error(tmp_path, override, message):
  proc = cli("--config=configs/quickstart.py", f"--workdir={tmp_path}", override)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr or "batchsize" in message


def test_missing_data_names_the_path(tmp_path):
  missing = tmp_path / "no_cifar_here"
  proc = cli("--config=configs/cifar10_resnet110.py", f"--workdir={tmp_path / 'w'}",
             "--config.data.source=bin", f"--config.data.dir={missing}")
  assert proc.returncode == 2
  assert str(missing) in proc.stderr
  assert "Traceback" not in proc.stderr
