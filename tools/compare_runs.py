"""Are two run folders the same results? Every number of every JSON file and every PNG's bytes.

    python tools/compare_runs.py runs/before runs/after

For a change that must not move any number (a restructuring, another evaluation path): run the
same command with the code before and after, then compare the workdirs. Timings (keys ending
in ``_s``) and paths are not results and are left out. Exits 1 when anything differs, listing
the first differences.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator

NOT_RESULTS = ("_s",)  # key suffixes of timings, which no two runs share


def differences(a: Any, b: Any, where: str = "") -> Iterator[str]:
  """Each place where the JSON values ``a`` and ``b`` differ (numbers exactly; NaN equals
  NaN)."""
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      if key.endswith(NOT_RESULTS):
        continue
      if key not in a or key not in b:
        yield f"{where}.{key}: only in {'the second' if key in b else 'the first'}"
      else:
        yield from differences(a[key], b[key], f"{where}.{key}")
  elif isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      yield f"{where}: {len(a)} vs {len(b)} entries"
    else:
      for i, (x, y) in enumerate(zip(a, b)):
        yield from differences(x, y, f"{where}[{i}]")
  elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return
  elif a != b or type(a) is not type(b):
    yield f"{where}: {a!r} vs {b!r}"


def count_numbers(value: Any) -> int:
  if isinstance(value, dict):
    return sum(count_numbers(v) for k, v in value.items() if not k.endswith(NOT_RESULTS))
  if isinstance(value, list):
    return sum(count_numbers(v) for v in value)
  return int(isinstance(value, (int, float)) and not isinstance(value, bool))


def compare(first: Path, second: Path) -> tuple[dict[str, int], list[str]]:
  """(counts of JSON files, numbers and PNGs compared, the differences) of two folders."""
  counts, found = {"json": 0, "numbers": 0, "png": 0}, []
  names = sorted({p.relative_to(root) for root in (first, second) for p in root.rglob("*")
                  if p.suffix in (".json", ".png")})
  for name in names:
    a, b = first / name, second / name
    if not (a.exists() and b.exists()):
      found.append(f"{name}: only in {first if a.exists() else second}")
      continue
    if name.suffix == ".png":
      counts["png"] += 1
      if a.read_bytes() != b.read_bytes():
        found.append(f"{name}: the images differ")
      continue
    va, vb = json.loads(a.read_text()), json.loads(b.read_text())
    counts["json"] += 1
    counts["numbers"] += count_numbers(va)
    found += [f"{name}{d}" for d in differences(va, vb)]
  return counts, found


def main(argv: list[str]) -> int:
  if len(argv) != 3:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  first, second = Path(argv[1]), Path(argv[2])
  for folder in (first, second):
    if not folder.is_dir():
      print(f"compare_runs: {folder} is not a folder", file=sys.stderr)
      return 2
  counts, found = compare(first, second)
  print(f"{counts['json']} JSON files ({counts['numbers']:,} numbers), {counts['png']} PNGs: "
        f"{len(found)} differences")
  for line in found[:40]:
    print("  " + line)
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
