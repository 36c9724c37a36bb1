"""Importing torchvision-layout ResNet weights (resnet_ensemble/pretrained.py).

The torch tests compare against a reference forward written here with torch.nn.functional over
the same random state dict (no torchvision, no downloads); narrow copies (width 8) keep them fast.
"""

import importlib.util
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from resnet_ensemble import pretrained
from tests.conftest import Payload

WIDTH = 8
CLASSES = 10


def random_state_dict(arch, seed=0, width=WIDTH, num_classes=CLASSES):
  """Random torchvision-named weights with non-trivial BN statistics, scaled so activations
  stay O(1) through the network."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in pretrained.expected_shapes(arch, num_classes, width).items():
    leaf = key.rsplit(".", 1)[1]
    if len(shape) == 4:
      fan_in = shape[1] * shape[2] * shape[3]
      a = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif key == "fc.weight":
      a = rng.normal(0.0, np.sqrt(1.0 / shape[1]), shape)
    elif leaf == "weight":
      a = rng.uniform(0.5, 1.0, shape)
    elif leaf == "bias":
      a = rng.normal(0.0, 0.1, shape)
    elif leaf == "running_mean":
      a = rng.normal(0.0, 0.2, shape)
    else:
      a = rng.uniform(0.5, 2.0, shape)
    out[key] = a.astype(np.float32)
  return out


def torch_forward(arch, sd, x, drop=()):
  """torchvision's ResNet forward in plain torch.nn.functional; ``drop``: global indices of
  blocks whose residual branch is removed (y = relu(shortcut(x)))."""
  import torch
  import torch.nn.functional as F
  t = {k: torch.from_numpy(v) for k, v in sd.items()}

  def bn(prefix, h):
    return F.batch_norm(h, t[f"{prefix}.running_mean"], t[f"{prefix}.running_var"],
                        t[f"{prefix}.weight"], t[f"{prefix}.bias"], training=False, eps=1e-5)

  block, stages, _, _ = pretrained.ARCHS[arch]
  h = torch.from_numpy(x)
  h = F.relu(bn("bn1", F.conv2d(h, t["conv1.weight"], stride=2, padding=3)))
  h = F.max_pool2d(h, 3, stride=2, padding=1)
  index = 0
  for s, n in enumerate(stages):
    for j in range(n):
      p = f"layer{s + 1}.{j}"
      stride = 2 if (s > 0 and j == 0) else 1
      if f"{p}.downsample.0.weight" in t:
        shortcut = bn(f"{p}.downsample.1", F.conv2d(h, t[f"{p}.downsample.0.weight"],
                                                    stride=stride))
      else:
        shortcut = h
      if index in drop:
        h = F.relu(shortcut)
      elif block == "basic":
        f = F.relu(bn(f"{p}.bn1", F.conv2d(h, t[f"{p}.conv1.weight"], stride=stride, padding=1)))
        f = bn(f"{p}.bn2", F.conv2d(f, t[f"{p}.conv2.weight"], padding=1))
        h = F.relu(shortcut + f)
      else:
        f = F.relu(bn(f"{p}.bn1", F.conv2d(h, t[f"{p}.conv1.weight"])))
        f = F.relu(bn(f"{p}.bn2", F.conv2d(f, t[f"{p}.conv2.weight"], stride=stride, padding=1)))
        f = bn(f"{p}.bn3", F.conv2d(f, t[f"{p}.conv3.weight"]))
        h = F.relu(shortcut + f)
      index += 1
  h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
  return F.linear(h, t["fc.weight"], t["fc.bias"]).numpy()


_CACHE = {}


def imported(arch):
  """(model, variables, jitted apply(x_nchw, gates), state dict, input) per arch, built once."""
  if arch not in _CACHE:
    sd = random_state_dict(arch, seed=len(arch))
    model, variables = pretrained.from_state_dict(arch, sd, width=WIDTH)
    apply = jax.jit(lambda x, g: model.apply(variables, jnp.transpose(x, (0, 2, 3, 1)), g))
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    _CACHE[arch] = model, variables, apply, sd, x
  return _CACHE[arch]


def assert_close(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  scale = float(np.max(np.abs(ref)))
  assert scale > 1e-2, "reference logits are degenerate"
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * scale)


# --- the layout itself (no torch needed) ------------------------------------------------------


@pytest.mark.parametrize("arch,keys,params", [
    # torchvision's state_dict sizes (with num_batches_tracked) and parameter counts.
    ("resnet18", 122, 11_689_512),
    ("resnet34", 218, 21_797_672),
    ("resnet50", 320, 25_557_032),
    ("resnet101", 626, 44_549_160),
    ("resnet152", 932, 60_192_808),
    ("wide_resnet50_2", 320, 68_883_240),
    ("wide_resnet101_2", 626, 126_886_696),
])
def test_full_size_layout_matches_torchvision(arch, keys, params):
  shapes = pretrained.expected_shapes(arch)
  n_bn = sum(k.endswith(".running_mean") for k in shapes)
  assert len(shapes) + n_bn == keys
  assert sum(int(np.prod(s)) for k, s in shapes.items() if ".running_" not in k) == params
  assert list(shapes)[:5] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                              "bn1.running_var"]
  assert list(shapes)[-2:] == ["fc.weight", "fc.bias"]
  assert shapes["conv1.weight"] == (64, 3, 7, 7)
  out = 2048 if pretrained.ARCHS[arch][0] == "bottleneck" else 512
  assert shapes["fc.weight"] == (1000, out)
  # resnet18/34's first block keeps the shape: no projection there.
  assert ("layer1.0.downsample.0.weight" in shapes) == (out == 2048)
  assert shapes["layer2.0.downsample.0.weight"] == (out // 4, out // 8, 1, 1)


def test_model_layout_indexes_blocks_like_cifar():
  model = pretrained.model_for("resnet50")
  assert model.layout.n_blocks == 16 and model.layout.downsampling == (0, 3, 7, 13)
  model = pretrained.model_for("resnet18")
  assert model.layout.n_blocks == 8 and model.layout.downsampling == (2, 4, 6)
  assert not model.preact and model.stem == "imagenet" and model.shortcut == "projection"


def test_wide_resnets_widen_the_bottleneck_only():
  shapes = pretrained.expected_shapes("wide_resnet50_2")
  assert shapes["layer1.0.conv1.weight"] == (128, 64, 1, 1)   # inner width doubled
  assert shapes["layer1.0.conv3.weight"] == (256, 128, 1, 1)  # output as resnet50
  with pytest.raises(ValueError, match="unknown arch 'resnet7'"):
    pretrained.model_for("resnet7")


def test_config_has_weights_and_arch():
  spec = importlib.util.spec_from_file_location(
      "imagenet_pretrained", os.path.join(os.path.dirname(__file__), "..", "configs",
                                          "imagenet_pretrained.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert c.weights == "" and c.arch == "resnet50"
  assert (c.model.name, c.model.block_form, c.data.name) == ("imagenet_resnet", "postact",
                                                             "imagenet2012")
  assert c.data.image_size == 224 and c.eval.batch_size == 250
  assert "--config.weights=/path/resnet50.safetensors --config.arch=resnet50" in module.__doc__


# --- equivalence with a plain-torch reference -------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "wide_resnet50_2"])
def test_logits_match_torch_reference(arch):
  model, _, apply, sd, x = imported(arch)
  ours = apply(x, jnp.ones((model.layout.n_blocks,)))
  assert_close(ours, torch_forward(arch, sd, x))


@pytest.mark.parametrize("arch,plain,down", [("resnet18", 3, 2), ("resnet50", 1, 7)])
def test_zero_gate_removes_the_residual_branch(arch, plain, down):
  model, _, apply, sd, x = imported(arch)
  assert down in model.layout.downsampling and plain not in model.layout.downsampling
  full = torch_forward(arch, sd, x)
  for block in (plain, down):
    gates = np.ones((model.layout.n_blocks,), np.float32)
    gates[block] = 0.0
    ref = torch_forward(arch, sd, x, drop={block})
    assert np.max(np.abs(ref - full)) > 1e-3 * np.max(np.abs(full)), "deletion changed nothing"
    assert_close(apply(x, jnp.asarray(gates)), ref)


# --- round trips ------------------------------------------------------------------------------


def _random_variables(arch):
  """Random float32 values for every leaf the model creates (no BN statistic left at 0/1)."""
  model = pretrained.model_for(arch, CLASSES, width=WIDTH)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda a: rng.uniform(0.1, 1.0, a.shape).astype(np.float32), abstract)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_safetensors_round_trip(arch, tmp_path):
  variables = _random_variables(arch)
  sd = pretrained.to_state_dict(arch, variables, width=WIDTH)
  assert list(sd) == list(pretrained.expected_shapes(arch, CLASSES, WIDTH))
  path = str(tmp_path / f"{arch}.safetensors")
  safetensors_numpy.save_file(sd, path)
  loaded = pretrained.load_weights(path)
  model, back = pretrained.from_state_dict(arch, loaded, width=WIDTH)
  assert model.num_classes == CLASSES
  assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(np.asarray, variables))
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  again = pretrained.to_state_dict(arch, back, width=WIDTH)
  assert all(np.array_equal(sd[k], again[k]) for k in sd) and sd.keys() == again.keys()


def test_pth_round_trip_and_num_batches_tracked(tmp_path):
  import torch
  sd = random_state_dict("resnet18")
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  tensors["bn1.num_batches_tracked"] = torch.tensor(7)
  tensors["layer2.0.downsample.1.num_batches_tracked"] = torch.tensor(7)
  path = str(tmp_path / "r18.pth")
  torch.save({"state_dict": {"module." + k: v for k, v in tensors.items()}}, path)
  loaded = pretrained.load_weights(path)
  _, variables = pretrained.from_state_dict("resnet18", loaded, width=WIDTH)
  back = pretrained.to_state_dict("resnet18", variables, width=WIDTH)
  assert back.keys() == sd.keys()
  assert all(np.array_equal(back[k], sd[k]) for k in sd)


# --- bad input ---------------------------------------------------------------------------------


def test_missing_unexpected_and_misshapen_keys_are_all_listed():
  sd = random_state_dict("resnet50")
  del sd["layer3.2.conv2.weight"], sd["fc.bias"]
  sd["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
  sd["layer1.0.bn9.num_batches_tracked"] = np.zeros((), np.int64)  # not a known BN
  sd["bn1.num_batches_tracked"] = np.zeros((), np.int64)            # fine
  sd["layer2.1.bn1.weight"] = np.zeros((3,), np.float32)
  sd["layer4.0.downsample.0.weight"] = np.zeros((1, 2, 3, 4), np.float32)
  with pytest.raises(ValueError) as e:
    pretrained.from_state_dict("resnet50", sd, width=WIDTH)
  msg = str(e.value)
  assert "2 missing key(s): fc.bias, layer3.2.conv2.weight" in msg
  assert "2 unexpected key(s): layer1.0.bn9.num_batches_tracked, layer5.0.conv1.weight" in msg
  assert "2 shape mismatch(es)" in msg
  assert "layer2.1.bn1.weight expected (16,) got (3,)" in msg
  assert "layer4.0.downsample.0.weight expected (256, 128, 1, 1) got (1, 2, 3, 4)" in msg
  assert "bn1.num_batches_tracked" not in msg.replace("bn9.num_batches_tracked", "")


@pytest.mark.parametrize("edit,pattern", [
    (lambda sd: sd.pop("layer1.1.conv1.weight"), r"1 missing key\(s\): layer1.1.conv1.weight"),
    (lambda sd: sd.update(extra=np.zeros(1)), r"1 unexpected key\(s\): extra"),
    (lambda sd: sd.update({"conv1.weight": np.zeros((8, 3, 3, 3))}),
     r"conv1.weight expected \(8, 3, 7, 7\) got \(8, 3, 3, 3\)"),
])
def test_each_kind_of_mismatch(edit, pattern):
  sd = random_state_dict("resnet18")
  edit(sd)
  with pytest.raises(ValueError, match=pattern):
    pretrained.from_state_dict("resnet18", sd, width=WIDTH)


def test_wrong_arch_is_a_shape_error():
  sd = random_state_dict("resnet18")
  with pytest.raises(ValueError, match="missing key"):
    pretrained.from_state_dict("resnet34", sd, width=WIDTH)
  with pytest.raises(ValueError, match="shape mismatch"):  # a full-width model expected
    pretrained.from_state_dict("resnet18", sd)


def test_pth_needing_full_unpickle_is_refused(tmp_path):
  import torch
  path = str(tmp_path / "evil.pth")
  torch.save({"conv1.weight": torch.zeros(2), "payload": Payload()}, path)
  with pytest.raises(ValueError, match="refusing to load") as e:
    pretrained.load_weights(path)
  assert "needs a full unpickle" in str(e.value) and "arbitrary code" in str(e.value)


def test_unknown_extension_and_missing_torch(tmp_path, monkeypatch):
  path = tmp_path / "weights.h5"
  path.write_bytes(b"")
  with pytest.raises(ValueError, match="unknown weights file type '.h5'"):
    pretrained.load_weights(path)
  pth = tmp_path / "weights.pth"
  pth.write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match="needs PyTorch"):
    pretrained.load_weights(pth)
  with pytest.raises(FileNotFoundError):
    pretrained.load_weights(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("name, content, message", [
    ("garbage.safetensors", os.urandom(300), "is not a readable .safetensors file"),
    ("empty.safetensors", b"", "is empty (0 bytes)"),
    ("empty.pth", b"", "is empty (0 bytes)"),
    ("random.pth", b"\x17" + os.urandom(300), "is not a PyTorch file (neither torch.save's zip"),
    ("cut.pth", None, "is not a readable PyTorch file (damaged or cut short)"),
])
def test_a_damaged_weights_file_is_one_error_naming_it(tmp_path, name, content, message):
  """Real garbage, as a copy gone wrong leaves it: named as damaged, never as a pickle that
  needs a full unpickle, never a traceback of the reader."""
  path = tmp_path / name
  if content is None:  # a real torch.save archive, cut in half
    import torch
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(path))
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  else:
    path.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(message)) as e:
    pretrained.load_weights(path)
  assert str(path) in str(e.value) and "\n" not in str(e.value)
  assert "unpickle" not in str(e.value)
