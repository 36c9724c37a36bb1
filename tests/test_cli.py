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


FIGURES = ["fig3_single_block_deletion.png", "fig5a_delete_k_blocks.png", "fig5b_reorder.png",
           "fig5c_single_swaps.png",
           "fig6a_path_lengths.png", "fig6b_gradient_per_length.png",
           "fig6c_total_gradient.png", "fig7_deletion_removes_long_paths.png"]


def test_quickstart_all_trains_analyses_and_reports(tmp_path):
  workdir = tmp_path / "quickstart"
  proc = cli("--config=configs/quickstart.py", f"--workdir={workdir}", "--mode=all",
             fast_compile=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["eval_accuracy"] > 0.8, final  # 10 classes: chance is 0.1
  assert "ETA" in proc.stdout
  assert (workdir / "metrics.jsonl").exists() and (workdir / "checkpoints").is_dir()
  for name in ["report.md", "lesion.json", "paths.json"] + FIGURES:
    assert (workdir / name).stat().st_size > 1000, name
  report = (workdir / "report.md").read_text()
  assert all(f in report for f in FIGURES)
  # A second --mode=all finds the checkpoint and does not train again.
  again = cli("--config=configs/quickstart.py", f"--workdir={workdir}", "--mode=report")
  assert again.returncode == 0 and "train " not in again.stdout


def test_analyses_without_a_checkpoint_name_the_workdir(tmp_path):
  proc = cli("--config=configs/quickstart.py", f"--workdir={tmp_path / 'empty'}", "--mode=lesion")
  assert proc.returncode == 2
  assert "no trained checkpoint in workdir" in proc.stderr and "empty" in proc.stderr


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
