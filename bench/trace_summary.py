"""What a profiled call spent its device time on: kernels by time, busy vs idle.

Reads the Perfetto/Chrome trace that ``jax.profiler.trace(dir, create_perfetto_trace=True)``
writes (``<dir>/plugins/profile/<run>/perfetto_trace.json.gz``), so no TensorBoard or
TensorFlow is needed. Kernels are the events on a device's stream threads (``Stream #…``);
the window is the first kernel's start to the last one's end, busy time the union of kernel
intervals. A window mostly idle, or full of microsecond kernels, says launch overhead bounds
the program; a busy one with a few long conv kernels says the arithmetic does.

  python bench/trace_summary.py /tmp/profile [--steps=50] [--top=15]
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys

# Kernel name → category (first match wins), for the share of time each kind takes.
CATEGORIES = (
  ("conv", re.compile(r"conv|cudnn|xmma|implicit_gemm|wgrad|dgrad|fprop|winograd", re.I)),
  ("gemm", re.compile(r"gemm|cublas|cutlass|matmul|triton_gemm", re.I)),
  ("copy", re.compile(r"memcpy|memset|copy", re.I)),
  ("reduction", re.compile(r"reduc", re.I)),
  ("fusion", re.compile(r"fusion|loop_|input_|triton", re.I)),
)


# Device lines a trace derives from the kernels (one event per XLA op, module or step).
DERIVED = re.compile(r"XLA|Steps|Framework|TensorFlow|Source|Launch", re.I)


def find_trace(path: str) -> str:
  """The newest perfetto_trace.json.gz under ``path`` (or ``path`` itself)."""
  if os.path.isfile(path):
    return path
  found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json*"), recursive=True),
                 key=os.path.getmtime)
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json(.gz) under {path} (was the trace "
                            "taken with create_perfetto_trace=True?)")
  return found[-1]


def load_events(path: str) -> list[dict]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def category(name: str) -> str:
  for label, pattern in CATEGORIES:
    if pattern.search(name):
      return label
  return "other"


def busy_time(intervals: list[tuple[float, float]]) -> float:
  """Length of the union of [start, end) intervals."""
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop <= end:
      continue
    total += stop - max(start, end)
    end = stop
  return total


def summarize(events: list[dict], steps: int = 1, top: int = 15) -> dict:
  """Device-kernel statistics of a trace (times in microseconds, as the trace has them)."""
  process, thread = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      process[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      thread[(e["pid"], e.get("tid"))] = e["args"]["name"]
  on_device = {key: name for key, name in thread.items()
               if process.get(key[0], "").startswith("/device:")}
  streams = {key for key, name in on_device.items() if name.startswith("Stream")}
  if not streams:  # other trace versions: every device line but the derived (op/step) ones
    streams = {key for key, name in on_device.items() if not DERIVED.match(name)}
  kernels = [e for e in events if e.get("ph") == "X" and (e["pid"], e.get("tid")) in streams
             and e.get("dur") is not None]
  out = {"trace_devices": sorted({process[p] for p, _ in streams}), "kernels": len(kernels),
         "kernel_lines": sorted({thread[key] for key in streams})}
  if not kernels:
    return {**out, "note": "no device kernels in the trace (a CPU run, or no CUPTI)"}
  intervals = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
  window = max(b for _, b in intervals) - min(a for a, _ in intervals)
  busy = busy_time(intervals)
  kernel_time = sum(e["dur"] for e in kernels)
  by_name = collections.defaultdict(lambda: [0, 0.0])
  by_category = collections.defaultdict(float)
  for e in kernels:
    by_name[e["name"]][0] += 1
    by_name[e["name"]][1] += e["dur"]
    by_category[category(e["name"])] += e["dur"]
  durations = sorted(e["dur"] for e in kernels)
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
  return {
      **out, "steps": steps, "window_ms": round(window / 1e3, 3),
      "busy_ms": round(busy / 1e3, 3), "idle_share": round(1 - busy / window, 4),
      "kernels_per_step": round(len(kernels) / steps, 1),
      "ms_per_step_window": round(window / 1e3 / steps, 3),
      "median_kernel_us": round(durations[len(durations) // 2], 2),
      "mean_kernel_us": round(kernel_time / len(kernels), 2),
      "share_by_category": {k: round(v / kernel_time, 4)
                            for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
      "top_kernels": [{"name": name[:120], "count": n, "ms": round(t / 1e3, 3),
                       "share": round(t / kernel_time, 4)} for name, (n, t) in ranked],
  }


def describe(s: dict) -> str:
  """A few human lines for the bench log."""
  if not s["kernels"]:
    return s.get("note", "no kernels")
  lines = [f"{s['kernels']} kernels ({s['kernels_per_step']:.0f}/step) in a "
           f"{s['window_ms']:.1f} ms window ({s['ms_per_step_window']:.2f} ms/step): busy "
           f"{s['busy_ms']:.1f} ms, idle {100 * s['idle_share']:.1f} %; kernel median "
           f"{s['median_kernel_us']:.1f} us, mean {s['mean_kernel_us']:.1f} us",
           "by kind: " + ", ".join(f"{k} {100 * v:.1f} %"
                                   for k, v in s["share_by_category"].items())]
  lines += [f"  {100 * k['share']:5.1f} %  {k['count']:6d} x  {k['name']}"
            for k in s["top_kernels"]]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  import argparse
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("path", help="a profile directory or a perfetto_trace.json(.gz)")
  p.add_argument("--steps", type=int, default=1, help="steps in the traced call (per-step rows)")
  p.add_argument("--top", type=int, default=15)
  args = p.parse_args(argv)
  s = summarize(load_events(find_trace(args.path)), args.steps, args.top)
  print(describe(s))
  print(json.dumps(s))


if __name__ == "__main__":
  main(sys.argv[1:])
