"""Published results: exported variables reproduce the checkpoint's analyses; the JPEG-gap
evaluation compares the same images at two pixel versions."""

import io
import json
import shutil

import jax
import numpy as np
import pytest

from resnet_ensemble import data as data_lib, lesion, restore, train
from tests.conftest import tiny_config
from tools import jpeg_gap


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(**{"train.num_steps": 6, "lesion.max_k": 2, "lesion.draws": 2,
                          "lesion.reorder_max_swaps": 2})  # ResNet-8: E4 skipped
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_exported_variables_give_the_checkpoints_results(finished_run, tmp_path):
  config, workdir = finished_run
  path = restore.export_variables(config, workdir)
  published = tmp_path / "published"
  published.mkdir()
  shutil.copy(path, published)
  shutil.copy(f"{workdir}/config.json", published)
  from_checkpoint, from_export = restore.load_trained(config, workdir), restore.load_trained(
      config, str(published))
  assert from_export.step == from_checkpoint.step == 6
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, from_checkpoint.variables),
               jax.tree.map(np.asarray, from_export.variables))
  ours = lesion.run_study(config, str(published))
  theirs = lesion.run_study(config, workdir)
  assert ours["single"] == theirs["single"] and ours["random"] == theirs["random"]
  assert "reorder" not in ours  # one block per stage: nothing to swap, E4 skipped


def test_exported_variables_of_another_model_are_refused(finished_run, tmp_path):
  config, workdir = finished_run
  restore.export_variables(config, workdir)
  other = tiny_config(**{"model.depth": 14})
  d = tmp_path / "other"
  d.mkdir()
  shutil.copy(f"{workdir}/{restore.VARIABLES_FILE}", d)  # no config.json: only the file decides
  with pytest.raises(ValueError, match="does not match the configured model"):
    restore.load_trained(other, str(d))
  (d / restore.VARIABLES_FILE).write_bytes(b"not msgpack at all")
  with pytest.raises(ValueError, match="not a readable exported variables file"):
    restore.load_trained(config, str(d))


def test_jpeg_gap_compares_the_same_images(finished_run, tmp_path):
  config, workdir = finished_run
  ds = data_lib.load(config.data)
  idx = np.arange(0, 40, 2)
  exact = ds.test_images[idx].copy()
  buffer = io.BytesIO()
  np.savez(buffer, test_images=exact, test_indices=idx, test_labels=ds.test_labels[idx])
  (tmp_path / "exact.npz").write_bytes(buffer.getvalue())
  out = jpeg_gap.measure(config, workdir, str(tmp_path / "exact.npz"))
  # Identical pixels: no gap, and the error is that of those 20 test images.
  assert out["images"] == 20 and out["gap_points"] == 0.0 and out["mean_abs_pixel_diff"] == 0.0
  with open(f"{workdir}/jpeg_gap.json") as f:
    assert json.load(f)["error_exact"] == out["error_exact"]
  # Inverted pixels change the images, so the two errors are measured on different inputs.
  buffer = io.BytesIO()
  np.savez(buffer, test_images=255 - exact, test_indices=idx, test_labels=ds.test_labels[idx])
  (tmp_path / "inverted.npz").write_bytes(buffer.getvalue())
  inverted = jpeg_gap.measure(config, workdir, str(tmp_path / "inverted.npz"))
  assert inverted["error_jpeg"] == out["error_jpeg"] and inverted["mean_abs_pixel_diff"] > 50
  # Labels from another split are refused.
  buffer = io.BytesIO()
  np.savez(buffer, test_images=exact, test_indices=idx, test_labels=(ds.test_labels[idx] + 1) % 10)
  (tmp_path / "wrong.npz").write_bytes(buffer.getvalue())
  with pytest.raises(ValueError, match="does not match the test split"):
    jpeg_gap.measure(config, workdir, str(tmp_path / "wrong.npz"))
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    jpeg_gap.measure(config, workdir, str(tmp_path / "missing.npz"))
