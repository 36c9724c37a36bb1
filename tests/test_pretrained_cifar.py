"""Importing the standard PyTorch CIFAR ResNets (resnet_ensemble/pretrained_cifar.py) and the
data they are evaluated on (the exact-pixel test subset, their input normalisation).

The reference forward is written here with torch.nn.functional from the published description
of those networks (post-activation basic blocks; option A: every second pixel, the new channels
zero-padded half before and half after). Random narrow copies (width 4) always run; the real
published checkpoints and the exact subset are checked where ``$RESNET_ENSEMBLE_DATA`` holds
them (README "Data").
"""

import glob
import io
import lzma
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from resnet_ensemble import data as data_lib, pretrained, pretrained_cifar
from tests.conftest import REPO, Payload, offline_data

_WEIGHTS_DIR, WEIGHTS_MISSING = offline_data("pretrained", "cifar10")
WEIGHTS = sorted(glob.glob(os.path.join(_WEIGHTS_DIR, "resnet*.th"))) if _WEIGHTS_DIR else []
if _WEIGHTS_DIR and not WEIGHTS:
  WEIGHTS_MISSING = f"{_WEIGHTS_DIR} holds no resnet*.th"
EXACT, EXACT_MISSING = offline_data("cifar10", data_lib.EXACT_SUBSET_FILE)
WIDTH = 4


def random_state_dict(arch, seed=0, width=WIDTH):
  """Random weights in their naming, with non-trivial BN statistics, activations O(1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in pretrained_cifar.expected_shapes(arch, width=width).items():
    leaf = key.rsplit(".", 1)[1]
    if len(shape) == 4:
      a = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    elif key == "linear.weight":
      a = rng.normal(0.0, np.sqrt(1.0 / shape[1]), shape)
    elif leaf == "weight":
      a = rng.uniform(0.5, 1.0, shape)
    elif leaf in ("bias", "running_mean"):
      a = rng.normal(0.0, 0.2, shape)
    else:
      a = rng.uniform(0.5, 2.0, shape)
    out[key] = a.astype(np.float32)
  return out


def torch_forward(sd, x_nchw, drop=()):
  """The CIFAR ResNet's forward in plain torch.nn.functional on normalised NCHW inputs;
  ``drop``: global indices of blocks removed (the block's output is its shortcut, which a
  ReLU leaves unchanged: its input is non-negative)."""
  import torch
  import torch.nn.functional as F
  t = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}

  def bn(prefix, h):
    return F.batch_norm(h, t[f"{prefix}.running_mean"], t[f"{prefix}.running_var"],
                        t[f"{prefix}.weight"], t[f"{prefix}.bias"], training=False, eps=1e-5)

  h = F.relu(bn("bn1", F.conv2d(torch.from_numpy(x_nchw), t["conv1.weight"], padding=1)))
  index = 0
  for s in range(3):
    j = 0
    while f"layer{s + 1}.{j}.conv1.weight" in t:
      p = f"layer{s + 1}.{j}"
      planes, stride = t[f"{p}.conv1.weight"].shape[0], 2 if (s > 0 and j == 0) else 1
      if stride != 1 or h.shape[1] != planes:  # option A
        shortcut = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
      else:
        shortcut = h
      if index in drop:
        h = shortcut
      else:
        f = F.relu(bn(f"{p}.bn1", F.conv2d(h, t[f"{p}.conv1.weight"], stride=stride, padding=1)))
        f = bn(f"{p}.bn2", F.conv2d(f, t[f"{p}.conv2.weight"], padding=1))
        h = F.relu(shortcut + f)
      index, j = index + 1, j + 1
  h = h.mean(dim=(2, 3))
  return F.linear(h, t["linear.weight"], t["linear.bias"]).numpy()


def normalise(images_uint8):
  """Their input pipeline: ToTensor() then Normalize(ImageNet mean, std), as NCHW float32."""
  x = images_uint8.astype(np.float32) / 255.0
  mean = np.asarray([0.485, 0.456, 0.406], np.float32)
  std = np.asarray([0.229, 0.224, 0.225], np.float32)
  return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2))


def ours(model, variables, images_uint8, gates=None):
  """Our forward on the same uint8 images, normalised as configs/cifar10_pretrained.py does."""
  from resnet_ensemble.augment import normalize
  x = normalize(jnp.asarray(images_uint8), pretrained_cifar.INPUT_MEAN, pretrained_cifar.INPUT_STD)
  return np.asarray(jax.jit(model.apply)(variables, x, gates))


def assert_close(a, ref, tol=1e-4):
  a, ref = np.asarray(a), np.asarray(ref)
  assert a.shape == ref.shape
  assert float(np.max(np.abs(ref))) > 1e-2, "reference logits are degenerate"
  np.testing.assert_allclose(a, ref, rtol=0, atol=tol * max(1.0, float(np.max(np.abs(ref)))))


def images(n, seed=1):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


# --- the layout (no torch) ---------------------------------------------------------------------


@pytest.mark.parametrize("arch,params", [
    # The parameter counts the published model code states (0.27M, 0.46M, 0.66M, 0.85M, 1.7M,
    # 19.4M), exactly: weights + BN scale/bias + the linear layer.
    ("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586), ("resnet56", 853_018),
    ("resnet110", 1_727_962), ("resnet1202", 19_421_274)])
def test_layout_and_parameter_counts(arch, params):
  shapes = pretrained_cifar.expected_shapes(arch)
  counted = sum(int(np.prod(s)) for k, s in shapes.items()
                if not k.endswith(("running_mean", "running_var")))
  assert counted == params
  model = pretrained_cifar.model_for(arch)
  n = pretrained_cifar.ARCHS[arch]
  assert model.layout.n_blocks == 3 * n and model.layout.downsampling == (n, 2 * n)
  assert pretrained_cifar.arch_of(shapes) == arch
  assert list(shapes)[:2] == ["conv1.weight", "bn1.weight"]
  assert list(shapes)[-2:] == ["linear.weight", "linear.bias"]


# --- against the torch reference ---------------------------------------------------------------


_CACHE = {}


def imported(arch):
  if arch not in _CACHE:
    sd = random_state_dict(arch, seed=len(arch))
    model, variables = pretrained_cifar.from_state_dict("cifar", sd)
    _CACHE[arch] = model, variables, sd
  return _CACHE[arch]


@pytest.mark.parametrize("arch", ["resnet20", "resnet32"])
def test_logits_match_torch_reference(arch):
  model, variables, sd = imported(arch)
  assert model.widths == (WIDTH, 2 * WIDTH, 4 * WIDTH) and model.stage_sizes[0] == \
      pretrained_cifar.ARCHS[arch]
  x = images(4)
  assert_close(ours(model, variables, x), torch_forward(sd, normalise(x)))


def test_zero_channels_go_on_both_sides():
  """The option-A shortcut pads half the new channels before the old ones: putting them all
  after (a common variant) gives other logits, so the reference would catch it."""
  import torch.nn.functional as F
  model, variables, sd = imported("resnet20")
  x = images(2)
  ref = torch_forward(sd, normalise(x))
  original = F.pad
  try:
    F.pad = lambda h, pad, *a: original(h, pad[:4] + (0, pad[4] + pad[5]), *a)
    appended = torch_forward(sd, normalise(x))
  finally:
    F.pad = original
  assert np.max(np.abs(appended - ref)) > 1e-2
  assert_close(ours(model, variables, x), ref)


@pytest.mark.parametrize("block", [1, 3, 4, 6])  # plain, downsampling, plain, downsampling
def test_zero_gate_equals_the_reference_without_the_block(block):
  model, variables, sd = imported("resnet20")
  assert (block in model.layout.downsampling) == (block in (3, 6))
  x = images(3)
  full = torch_forward(sd, normalise(x))
  ref = torch_forward(sd, normalise(x), drop={block})
  assert np.max(np.abs(ref - full)) > 1e-3, "removing the block changed nothing"
  gates = np.ones((model.layout.n_blocks,), np.float32)
  gates[block] = 0.0
  assert_close(ours(model, variables, x, jnp.asarray(gates)), ref)


@pytest.mark.skipif(not WEIGHTS, reason=WEIGHTS_MISSING)
@pytest.mark.parametrize("path", WEIGHTS, ids=os.path.basename)
def test_published_checkpoints_match_the_reference_on_real_pixels(path):
  """Each published depth, imported from the .th as published (depth read from the file), on
  the exact-pixel test images (random ones if the subset is absent): logits within 1e-4."""
  model, variables = pretrained_cifar.load_pretrained("cifar", path)
  sd = pretrained.load_weights(path)
  depth = int(os.path.basename(path).split("-")[0][len("resnet"):])
  assert model.layout.n_blocks == (depth - 2) // 2
  if EXACT:
    z = data_lib.read_exact_subset(EXACT)
    x, labels = z["test_images"][:64], z["test_labels"][:64]
  else:
    x, labels = images(16), None
  logits = ours(model, variables, x)
  assert_close(logits, torch_forward(sd, normalise(x)))
  if labels is not None:  # a working network, not just a matching one
    assert np.mean(np.argmax(logits, 1) != labels) < 0.2


# --- round trips and bad files -----------------------------------------------------------------


def test_export_import_round_trip_is_exact(tmp_path):
  model, variables, sd = imported("resnet20")
  back = pretrained_cifar.to_state_dict("resnet20", variables, width=WIDTH)
  assert list(back) == list(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  path = str(tmp_path / "r20.safetensors")
  safetensors_numpy.save_file(back, path)
  model2, again = pretrained_cifar.load_pretrained("resnet20", path)
  assert model2 == model
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_th_as_published_round_trip(tmp_path):
  """A .th like the published ones: torch.save of {"best_prec1", "state_dict"} with
  DataParallel's module. prefix."""
  import torch
  _, variables, sd = imported("resnet32")
  path = str(tmp_path / "resnet32-0000.th")
  torch.save({"best_prec1": 92.5, "state_dict": {"module." + k: torch.from_numpy(v)
                                                 for k, v in sd.items()}}, path)
  model, back = pretrained_cifar.load_pretrained("resnet32", path)
  assert model.stage_sizes == (5, 5, 5)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_a_file_needing_a_full_unpickle_is_refused(tmp_path):
  import torch
  path = str(tmp_path / "evil.th")
  torch.save({"state_dict": {"conv1.weight": torch.zeros(2)}, "args": Payload()}, path)
  with pytest.raises(ValueError, match="refusing to load .*needs a full unpickle"):
    pretrained_cifar.load_pretrained("cifar", path)


def test_wrong_arch_names_the_tensors():
  sd = random_state_dict("resnet20")
  with pytest.raises(ValueError, match="does not match resnet32") as e:
    pretrained_cifar.from_state_dict("resnet32", sd)
  assert "missing key(s): layer1.3.bn1.bias" in str(e.value)
  with pytest.raises(ValueError, match=r"shape mismatch.*conv1.weight expected \(8, 3, 3, 3\) "
                     r"got \(4, 3, 3, 3\)"):
    pretrained_cifar.from_state_dict("resnet20", sd, width=8)
  extra = dict(sd, **{"layer2.0.shortcut.0.weight": np.zeros((8, 4, 1, 1), np.float32)})
  with pytest.raises(ValueError, match="unexpected key.*layer2.0.shortcut.0.weight"):
    pretrained_cifar.from_state_dict("cifar", extra)  # option B: not this network
  with pytest.raises(ValueError, match="not a CIFAR ResNet's"):
    pretrained_cifar.from_state_dict("cifar", {"fc.weight": np.zeros((10, 4), np.float32)})
  with pytest.raises(ValueError, match="unknown CIFAR ResNet arch 'resnet21'"):
    pretrained_cifar.model_for("resnet21")


# --- data: the exact subset as a source, the normalisation as a field ---------------------------


def write_subset(path, n=12, seed=3):
  rng = np.random.default_rng(seed)
  buffer = io.BytesIO()
  np.savez(buffer, test_images=images(n, seed), test_indices=np.arange(n) * 7,
           test_labels=rng.integers(0, 10, n).astype(np.uint8))
  with open(path, "wb") as f:
    f.write(lzma.compress(buffer.getvalue()))
  return path


def data_config(**fields):
  from resnet_ensemble.config import base_config
  c = base_config().data
  for k, v in fields.items():
    c[k] = v
  return c


def test_exact_subset_is_a_source_and_needs_the_normalisation(tmp_path):
  path = write_subset(str(tmp_path / data_lib.EXACT_SUBSET_FILE))
  mean, std = pretrained_cifar.INPUT_MEAN, pretrained_cifar.INPUT_STD
  for where in (path, str(tmp_path)):  # the file, or the folder holding it
    ds = data_lib.load(data_config(source="exact_subset", dir=where, mean=mean, std=std))
    assert ds.test_images.shape == (12, 32, 32, 3) and ds.mean == mean and ds.std == std
    np.testing.assert_array_equal(ds.test_images, images(12, 3))
  with pytest.raises(ValueError, match="set --config.data.mean and --config.data.std"):
    data_lib.load(data_config(source="exact_subset", dir=path))
  with pytest.raises(FileNotFoundError, match="exact test subset not found"):
    data_lib.load(data_config(source="exact_subset", dir=str(tmp_path / "nothing.npz"),
                              mean=mean, std=std))
  with pytest.raises(ValueError, match="unknown data source 'exact'"):
    data_lib.load(data_config(source="exact", dir=path))


def test_normalisation_field_overrides_the_train_split_statistics():
  own = data_lib.load(data_config(name="digits"))
  assert own.mean != (10.0,)
  ds = data_lib.load(data_config(name="digits", mean=(10.0,), std=(2.0,)))
  assert ds.mean == (10.0,) and ds.std == (2.0,)
  np.testing.assert_array_equal(ds.test_images, own.test_images)
  with pytest.raises(ValueError, match="one value per channel"):
    data_lib.load(data_config(name="digits", mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 1.0)))
  with pytest.raises(ValueError, match="must be > 0"):
    data_lib.load(data_config(name="digits", mean=(1.0,), std=(0.0,)))


def test_a_run_started_before_the_field_existed_is_still_analysable(tmp_path):
  """A workdir's config.json without data.mean/std reads as their default (the train split's
  own statistics): the old run is neither refused nor analysed another way."""
  import json
  from resnet_ensemble import workdir
  from resnet_ensemble.config import base_config
  c = base_config()
  old = json.loads(c.to_json())
  del old["data"]["mean"], old["data"]["std"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  workdir.check_analysis(str(tmp_path), c)
  c.data.mean, c.data.std = (1.0, 2.0, 3.0), (1.0, 1.0, 1.0)
  with pytest.raises(Exception, match="data.mean"):
    workdir.check_analysis(str(tmp_path), c)


def test_the_cli_never_trains_on_the_exact_subset(tiny, tmp_path):
  from resnet_ensemble import __main__ as cli
  c = tiny(**{"data.name": "cifar10", "data.source": "exact_subset"})
  with pytest.raises(ValueError, match="exact_subset is a test set"):
    cli.run_mode("train", c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.skipif(not EXACT, reason=EXACT_MISSING)
def test_the_real_exact_subset_reads_as_cifar10():
  ds = data_lib.load(data_config(source="exact_subset", dir=os.path.dirname(EXACT),
                                 mean=pretrained_cifar.INPUT_MEAN, std=pretrained_cifar.INPUT_STD))
  assert ds.test_images.shape == (1017, 32, 32, 3) and ds.num_classes == 10
  assert np.bincount(ds.test_labels, minlength=10).min() > 50


# --- the CLI flow: every analysis on imported weights, nothing trained ------------------------


def test_mode_all_runs_the_analyses_on_imported_weights(tmp_path):
  """configs/cifar10_pretrained.py with a tiny random ResNet-20 (.safetensors) on a synthetic
  exact subset: --mode=all writes lesion.json, gradients.json and the report without training,
  and the lesion study's baseline is the direct evaluation of the same images."""
  import importlib.util
  from resnet_ensemble import __main__ as cli
  from resnet_ensemble.config import override
  weights = str(tmp_path / "r20.safetensors")
  _, variables, sd = imported("resnet20")
  safetensors_numpy.save_file(sd, weights)
  subset = write_subset(str(tmp_path / data_lib.EXACT_SUBSET_FILE), n=10)
  spec = importlib.util.spec_from_file_location(
      "cifar10_pretrained", os.path.join(REPO, "configs", "cifar10_pretrained.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for field, value in {"weights": weights, "data.dir": str(tmp_path), "eval.batch_size": 4,
                       "lesion.max_k": 2, "lesion.draws": 2, "lesion.reorder_max_swaps": 1,
                       "lesion.reorder_draws": 2, "lesion.chunk": 4,
                       "paths.samples_per_k": 2, "paths.batch_size": 4,
                       "paths.chunk": 4}.items():
    override(c, field, value)
  workdir = str(tmp_path / "w")
  cli.run_mode("all", c, workdir)
  import json
  lesion = json.load(open(os.path.join(workdir, "lesion.json")))
  paths = json.load(open(os.path.join(workdir, "gradients.json")))
  assert os.path.isfile(os.path.join(workdir, "report.md"))
  assert not os.path.isdir(os.path.join(workdir, "checkpoints"))
  assert len(lesion["single"]["error"]) == 9 and paths["n"] == 9
  assert "exact-pixel test subset" in lesion["data_source"]
  z = data_lib.read_exact_subset(subset)
  model = pretrained_cifar.model_for("resnet20", width=WIDTH)
  direct = np.mean(np.argmax(ours(model, variables, z["test_images"]), 1) != z["test_labels"])
  assert lesion["baseline"]["error"] == pytest.approx(direct, abs=1e-6)


def test_source_errors_compare_the_same_images_on_each_source(tmp_path):
  """source_errors: the subset's error, the binary copy's, and the copy's version of the
  subset's images (equal to the subset's when the copy holds the same pixels), with SEs."""
  from tools import source_errors
  from resnet_ensemble.config import base_config
  _, variables, sd = imported("resnet20")
  weights = str(tmp_path / "r20.safetensors")
  safetensors_numpy.save_file(sd, weights)
  subset = data_lib.read_exact_subset(write_subset(str(tmp_path / data_lib.EXACT_SUBSET_FILE)))
  test_x = images(90, seed=5)
  test_y = np.random.default_rng(6).integers(0, 10, 90).astype(np.uint8)
  test_x[subset["test_indices"]] = subset["test_images"]
  test_y[subset["test_indices"]] = subset["test_labels"]
  data_lib.write_cifar10_bin(str(tmp_path / "bin"), test_x[:10], test_y[:10], test_x, test_y)
  c = base_config()
  c.weights, c.arch, c.data.dir, c.eval.batch_size = weights, "cifar", str(tmp_path), 8
  c.data.mean, c.data.std = pretrained_cifar.INPUT_MEAN, pretrained_cifar.INPUT_STD
  out = source_errors.measure(c, str(tmp_path / "bin"), "copy", None)
  model = pretrained_cifar.model_for("resnet20", width=WIDTH)
  direct = np.mean(np.argmax(ours(model, variables, test_x), 1) != test_y)
  assert out["copy"]["images"] == 90 and out["copy"]["error"] == pytest.approx(direct, abs=1e-6)
  assert out["copy, subset images"]["error"] == pytest.approx(out["exact_subset"]["error"])
  e = out["exact_subset"]["error"]
  assert out["exact_subset"]["se"] == pytest.approx(np.sqrt(e * (1 - e) / 12))
  test_y[subset["test_indices"][0]] = (test_y[subset["test_indices"][0]] + 1) % 10
  data_lib.write_cifar10_bin(str(tmp_path / "bin"), test_x[:10], test_y[:10], test_x, test_y)
  with pytest.raises(ValueError, match="test labels differ"):
    source_errors.measure(c, str(tmp_path / "bin"), "copy", None)
