"""The CPU speed table from bench/cpu_rows.sh's JSON lines: each JAX row beside the PyTorch row
measured right after it, as a ratio of times (> 1: JAX slower).

    python bench/cpu_ratios.py /tmp/bench_cpu/bench.jsonl
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table import read  # noqa: E402  (a sibling script, imported as bench/ scripts do)

# Per workload: the JSON field holding its cost, and whether it is a rate (per second).
COST = {"train": ("ms_per_step", False), "eval": ("img_per_s", True),
        "paths_E6": ("paths_per_s", True)}


def kind(row: dict) -> str | None:
  """The workload family of a row ("train[r20]" -> "train"), or None for other rows."""
  name = row.get("workload", "").split("[")[0]
  return name if name in COST else None


def pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
  """(JAX row, the next PyTorch row of the same family): the rows cpu_rows.sh measured."""
  measured = [r for r in rows if kind(r) and "skipped" not in r and "error" not in r]
  out = []
  for i, r in enumerate(measured):
    if r.get("impl", "jax") == "torch":
      continue
    after = next((t for t in measured[i + 1:] if t.get("impl") == "torch"), None)
    if after is not None and kind(after) == kind(r):
      out.append((r, after))
  return out


def seconds_per_unit(row: dict) -> float:
  key, rate = COST[kind(row)]
  return 1.0 / row[key] if rate else row[key] / 1e3


def table(rows: list[dict]) -> str:
  lines = ["| workload | model | batch | JAX | PyTorch | JAX time / PyTorch time |",
           "| --- | --- | --- | --- | --- | --- |"]
  for jax_row, torch_row in pairs(rows):
    key, _ = COST[kind(jax_row)]
    ratio = seconds_per_unit(jax_row) / seconds_per_unit(torch_row)
    lines.append(f"| {jax_row['workload']} | {jax_row.get('model', '')} | {jax_row.get('batch')} "
                 f"| {jax_row[key]:,} {key} | {torch_row[key]:,} | {ratio:.2f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(table(read(sys.argv[1])))
