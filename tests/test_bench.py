"""The benchmarks keep running (no timing is asserted: speed goals live in bench/)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_bench_prints_a_measurement():
  proc = subprocess.run(
      [sys.executable, "bench/train_step.py", "--config=configs/quickstart.py", "--calls=1",
       "--num_examples=500", "--config.train.steps_per_call=2", "--config.gates.sampler=effective",
       "--config.gates.k=5"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-2000:]
  row = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
  assert row["what"] == "train_step" and row["gates"] == "effective"
  assert row["ms_per_step"] > 0 and row["compile_s"] > 0
