"""tools/compare_runs.py: two run folders compared number by number and image by image."""

import json

from tools import compare_runs


def _write(folder, lesion, png=b"\x89PNG one"):
  folder.mkdir()
  (folder / "lesion.json").write_text(json.dumps(lesion))
  (folder / "fig.png").write_bytes(png)


def test_equal_runs_and_every_kind_of_difference(tmp_path, capsys):
  lesion = {"baseline": {"error": 0.1}, "single": {"error": [0.2, float("nan")]},
            "compile_s": 3.0, "k": [1, 2]}
  _write(tmp_path / "a", lesion)
  _write(tmp_path / "b", {**lesion, "compile_s": 9.0})  # timings are not results
  assert compare_runs.main(["compare_runs", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
  assert "1 JSON files (5 numbers), 1 PNGs: 0 differences" in capsys.readouterr().out

  moved = {**lesion, "baseline": {"error": 0.1 + 1e-12}, "k": [1, 2, 3], "extra": 1}
  _write(tmp_path / "c", moved, png=b"\x89PNG two")
  (tmp_path / "c" / "gradients.json").write_text("{}")
  counts, found = compare_runs.compare(tmp_path / "a", tmp_path / "c")
  assert counts == {"json": 1, "numbers": 5, "png": 1}
  assert sorted(found) == sorted([
      "fig.png: the images differ", f"gradients.json: only in {tmp_path / 'c'}",
      f"lesion.json.baseline.error: 0.1 vs {0.1 + 1e-12!r}",
      "lesion.json.extra: only in the second",
      "lesion.json.k: 2 vs 3 entries"])
  assert compare_runs.main(["compare_runs", str(tmp_path / "a"), str(tmp_path / "c")]) == 1
  assert compare_runs.main(["compare_runs", str(tmp_path / "a"), str(tmp_path / "x")]) == 2
