"""What the bench scripts share: one JSON line per measurement, synthetic data, timing loops.

Every row goes to stdout (after a human-readable line) and, with ``--out``, is appended to a
file as soon as it is measured, so a step killed by its timeout keeps the rows it finished.
Rows name their ``workload`` and ``impl`` (jax | torch), the device and the time, so
``bench/table.py`` can read one ``bench.jsonl`` written by several scripts.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import Any, Callable

import numpy as np
from absl import flags

flags.DEFINE_string("out", "", "Also append every JSON line to this file (e.g. $OUT/bench.jsonl).")
flags.DEFINE_string("profile_dir", "", "Also trace one more call with jax.profiler into this "
                    "folder and emit a 'profile' row: device kernels by time, busy vs idle.")
flags.DEFINE_float("time_cap_s", 0.0, "Stop timing once this many seconds have passed "
                   "(0 = no cap); capped rows say so and project the full workload.")

# Image shape of each dataset the configs name: synthetic data of the same shape is timed.
SHAPES = {"digits": (8, 8, 1), "cifar10": (32, 32, 3)}


def jax_info() -> dict:
  """Device and software fields every JAX row carries."""
  import jax
  import os
  d = jax.devices()[0]
  return {"impl": "jax", "device": d.device_kind, "platform": d.platform,
          "devices": jax.device_count(), "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "compile_cache": jax.config.jax_compilation_cache_dir or ""}


_START = time.perf_counter()


def progress(what: str) -> None:
  """One stderr line per phase with the seconds since start: a step cut by its timeout still
  says where its time went (setup, compile, warm-up or the timed calls)."""
  print(f"[{time.perf_counter() - _START:7.1f} s] {what}", file=sys.stderr, flush=True)


def emit(row: dict, human: str | None = None) -> dict:
  """Prints ``human`` and the row as JSON; appends the JSON to ``--out``."""
  row = {**row, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  line = json.dumps(row)
  if human:
    print(human, flush=True)
  print(line, flush=True)
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, "a") as f:
      f.write(line + "\n")
  return row


def synthetic(config, num_train: int, num_test: int):
  """Random uint8 images of the configured dataset's shape: only model work is timed."""
  from resnet_ensemble import data as data_lib
  shape = SHAPES.get(config.data.name, (32, 32, 3))
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (num_train,) + shape, dtype=np.uint8)
  y = rng.integers(0, 10, num_train).astype(np.int32)
  xt = rng.integers(0, 256, (num_test,) + shape, dtype=np.uint8)
  yt = rng.integers(0, 10, num_test).astype(np.int32)
  return data_lib.ImageDataset("synthetic", x, y, xt, yt, 10, (128.0,) * shape[-1],
                               (64.0,) * shape[-1], "synthetic")


def model_variables(model, config, input_shape, path: str = "") -> tuple[dict, str]:
  """Random-init variables (timing does not need a trained net), or an exported
  ``variables.msgpack`` when ``path`` is given; also says which."""
  import jax
  import jax.numpy as jnp
  if path:
    from resnet_ensemble import restore
    variables, step = restore.read_variables(path, model, input_shape)
    return variables, f"{path}@{step}"
  from resnet_ensemble.sharding import on_host
  variables = on_host(lambda: model.init(
      jax.random.key(config.seed), jnp.zeros((1,) + tuple(input_shape), jnp.float32)))
  return dict(variables), "random_init"


def timed(call: Callable[[], Any], max_calls: int, time_cap_s: float) -> tuple[int, float]:
  """Runs ``call()`` (which returns arrays) up to ``max_calls`` times, waiting for each, or
  until ``time_cap_s`` has passed (0 = no cap); returns (calls made, seconds).

  Waiting per call costs a launch gap (microseconds) next to calls of milliseconds or more,
  and lets the cap stop a run whose calls would otherwise all be queued at once."""
  import jax
  done, t0 = 0, time.perf_counter()
  while done < max_calls:
    jax.block_until_ready(call())
    done += 1
    if time_cap_s and time.perf_counter() - t0 >= time_cap_s:
      break
  return done, time.perf_counter() - t0


def best_call_s(call: Callable[[], Any], calls: int) -> float:
  """The fastest of ``calls`` timed calls (each waited for): on a shared, noisy machine the
  minimum is the cost closest to the work itself."""
  import jax
  best = float("inf")
  for _ in range(max(calls, 1)):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    best = min(best, time.perf_counter() - t0)
  return best


def config_name() -> str:
  """The --config file's base name (the configs/*.py a row was measured with)."""
  import os
  from ml_collections import config_flags
  try:
    return os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))
  except Exception:  # no --config flag in this script
    return ""


def profile(call: Callable[[], Any], of: dict, steps: int = 1) -> dict | None:
  """With ``--profile_dir``: one more ``call()`` under ``jax.profiler.trace``, summarised by
  ``trace_summary`` into a ``profile`` row naming the measurement ``of`` (its workload,
  batch...). Each measurement gets its own subfolder; the trace stays there for Perfetto."""
  if not flags.FLAGS.profile_dir:
    return None
  import os
  import jax
  import trace_summary
  name = "_".join(str(of[k]) for k in ("workload", "batch") if k in of)
  folder = os.path.join(flags.FLAGS.profile_dir, name)
  try:  # the measurement is already out: a profiler that fails must not lose it
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      jax.block_until_ready(call())
    summary = trace_summary.summarize(
        trace_summary.load_events(trace_summary.find_trace(folder)), steps)
  except Exception as e:  # noqa: BLE001 (no CUPTI, a profiler already running, ...)
    summary = {"kernels": 0, "note": f"profiling failed: {type(e).__name__}: {e}"}
  return emit({"workload": "profile", "of": of, **jax_info(), "trace_dir": folder, **summary},
              human=f"profile of {name}:\n" + trace_summary.describe(summary))

