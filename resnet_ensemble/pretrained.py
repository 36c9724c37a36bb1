"""Pretrained torchvision / timm ImageNet ResNets as gated Flax models.

torchvision's ``resnet18/34/50/101/152`` (and timm's plain ``resnet*`` models, which use the
same names) are post-activation ResNets with a 7x7/2 stem + 3x3/2 max-pool, the stride on the
3x3 convolution, and a 1x1 projection (conv + BN) shortcut on each stage's first block when its
shape changes. That is ``models.ResNet(preact=False, stem="imagenet", shortcut="projection")``;
this module maps between the two namings:

    torchvision                          ours (params / batch_stats)
    conv1.weight (O,I,H,W)               stem_conv/kernel (H,W,I,O)
    bn1.{weight,bias}                    stem_bn/{scale,bias}
    bn1.{running_mean,running_var}       stem_bn/{mean,var} (batch_stats)
    layer{s+1}.0.*   (shape-changing)    stage{s}_down/*
    layer{s+1}.{j}.* (the others)        stage{s}_blocks/*[k], k = j-1 (j if layer{s+1}.0 keeps
                                         the shape: resnet18/34's layer1), stacked on axis 0
      .conv{i}.weight / .bn{i}.*           conv{i}/kernel, bn{i}/...
      .downsample.0.weight                 proj_conv/kernel
      .downsample.1.*                      proj_bn/...
    fc.weight (out,in), fc.bias          head/kernel (in,out), head/bias

``num_batches_tracked`` is ignored on import and not written on export. Everything is float32.

The wide ResNets (``wide_resnet50_2``, ``wide_resnet101_2``) double the bottleneck's inner
width (128..1024) and keep its output (256..2048): ``models.ResNet(expansion=2)``.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble import models
from resnet_ensemble.layout import down_name, stacked_name

# torchvision arch -> (block, stage_sizes, stem width, inner-width multiplier).
ARCHS: dict[str, tuple[str, tuple[int, ...], int, int]] = {
    **{f"resnet{depth}": (block, stages, 64, 1)
       for depth, (block, stages) in models.IMAGENET_STAGES.items()
       if depth in (18, 34, 50, 101, 152)},
    "wide_resnet50_2": ("bottleneck", models.IMAGENET_STAGES[50][1], 64, 2),
    "wide_resnet101_2": ("bottleneck", models.IMAGENET_STAGES[101][1], 64, 2),
}

IMAGENET_CLASSES = 1000

# Our leaf name -> torchvision parameter/buffer suffix, per kind of layer.
_CONV_LEAVES = {"kernel": "weight"}
_DENSE_LEAVES = {"kernel": "weight", "bias": "bias"}
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _arch(arch: str) -> tuple[str, tuple[int, ...], int, int]:
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; supported: {', '.join(ARCHS)}")
  return ARCHS[arch]


def model_for(arch: str, num_classes: int = IMAGENET_CLASSES, dtype: Any = jnp.float32,
              width: int | None = None, unroll: int = -1) -> models.ResNet:
  """The gated Flax ResNet with torchvision ``arch``'s layout (post-activation, ImageNet stem,
  projection shortcuts). ``width`` (default 64) scales all stages (tests use narrow copies)."""
  block, stages, default_width, wide = _arch(arch)
  w = width or default_width
  return models.ResNet(stage_sizes=stages, widths=tuple(wide * w * m for m in (1, 2, 4, 8)),
                       block=block, stem="imagenet", stem_width=w, preact=False,
                       shortcut="projection", num_classes=num_classes, dtype=dtype,
                       unroll=unroll, expansion=4 // wide if block == "bottleneck" else None)


# ---------------------------------------------------------------------------------------------
# The name mapping, derived from the model's own (abstract) variable tree.


def _abstract_variables(model: models.ResNet) -> dict:
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return flax.core.unfreeze(jax.eval_shape(model.init, jax.random.key(0), x))


def _torch_prefix(model: models.ResNet, top: str, index: int | None, head: str = "fc") -> str:
  """Torchvision module name of our top-level subtree ``top`` (``index``: stacked position;
  ``head``: the classifier's module name, ``fc`` in torchvision)."""
  if top == "stem_conv":
    return "conv1"
  if top == "stem_bn":
    return "bn1"
  if top == "head":
    return head
  m = re.fullmatch(r"stage(\d+)_(down|blocks)", top)
  if m is None:
    raise AssertionError(f"unexpected subtree {top!r} in the model")
  s = int(m.group(1))
  if top == down_name(s):
    return f"layer{s + 1}.0"
  assert top == stacked_name(s)
  offset = 1 if model.layout.first_is_down[s] else 0
  return f"layer{s + 1}.{index + offset}"


def _torch_module(name: str) -> tuple[str, dict[str, str]]:
  """A block's submodule name -> (torchvision submodule name, leaf-name map)."""
  if name == "proj_conv":
    return "downsample.0", _CONV_LEAVES
  if name == "proj_bn":
    return "downsample.1", _BN_LEAVES
  if re.fullmatch(r"conv\d", name):
    return name, _CONV_LEAVES
  if re.fullmatch(r"bn\d", name):
    return name, _BN_LEAVES
  raise AssertionError(f"unexpected block submodule {name!r}")


def _to_torch(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.transpose(a, (3, 2, 0, 1))  # HWIO -> OIHW
  if kind == "dense":
    return np.transpose(a, (1, 0))        # (in, out) -> (out, in)
  return a


def _from_torch(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.transpose(a, (2, 3, 1, 0))  # OIHW -> HWIO
  if kind == "dense":
    return np.transpose(a, (1, 0))
  return a


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  perm = {"conv": (3, 2, 0, 1), "dense": (1, 0)}.get(kind, tuple(range(len(shape))))
  return tuple(shape[i] for i in perm)


def _mapping(model: models.ResNet, head: str = "fc"
             ) -> list[tuple[str, tuple[str, ...], int | None, str, tuple]]:
  """Every variable leaf as (torch key, our path, stacked index or None, kind, our leaf shape):
  kind is conv | dense | bn (the latter also covers the head's bias). ``head``: the
  classifier's torch module name."""
  entries = []
  for path, leaf in flax.traverse_util.flatten_dict(_abstract_variables(model)).items():
    collection, top, *rest = path
    stacked = top.startswith("stage") and top.endswith("_blocks")
    count = leaf.shape[0] if stacked else 1
    shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
    if top in ("stem_conv", "stem_bn", "head"):
      (name,) = rest
      leaves = {"stem_conv": _CONV_LEAVES, "stem_bn": _BN_LEAVES, "head": _DENSE_LEAVES}[top]
      module_suffix = ""
      kind = {"stem_conv": "conv", "stem_bn": "bn", "head": "dense"}[top]
    else:
      sub, name = rest
      module_suffix, leaves = _torch_module(sub)
      module_suffix = "." + module_suffix
      kind = "conv" if leaves is _CONV_LEAVES else "bn"
    if kind == "dense" and name == "bias":
      kind = "bn"  # a vector: no transpose
    for i in range(count):
      index = i if stacked else None
      key = f"{_torch_prefix(model, top, index, head)}{module_suffix}.{leaves[name]}"
      entries.append((key, path, index, kind, shape))
  return sorted(entries, key=lambda e: _torch_order(e[0], head))


_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var")


def _torch_order(key: str, head: str = "fc") -> tuple:
  """Sort key giving torchvision's state_dict order (stem, layers, blocks, modules, head)."""
  *module, leaf = key.split(".")
  if module[0].startswith("layer"):
    layer, block, *sub = module
    section = (1, int(layer[len("layer"):]), int(block))
    sub = ".".join(sub)
    pos = (2, sub) if sub.startswith("downsample") else (1, sub[-1], sub[:-1] != "conv")
  else:
    section, pos = ((0,), (module[0] == "bn1",)) if module[0] != head else ((2,), ())
  return section, pos, _LEAF_ORDER.index(leaf)


def expected_shapes(arch: str, num_classes: int = IMAGENET_CLASSES,
                    width: int | None = None) -> dict[str, tuple[int, ...]]:
  """Torchvision key -> shape of every tensor ``arch``'s state dict must hold (without
  ``num_batches_tracked``)."""
  model = model_for(arch, num_classes, width=width)
  return {key: _torch_shape(kind, shape) for key, _, _, kind, shape in _mapping(model)}


# ---------------------------------------------------------------------------------------------
# Import / export.


def _as_array(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor handed over directly
    value = value.detach().cpu().float().numpy()
  return np.asarray(value)


def from_state_dict(arch: str, state_dict: Mapping[str, Any], num_classes: int | None = None,
                    width: int | None = None, dtype: Any = jnp.float32,
                    unroll: int = -1) -> tuple[models.ResNet, dict]:
  """(gated Flax model, {"params", "batch_stats"} as float32 numpy) from a torchvision-named
  state dict of ``arch``. ``num_classes`` defaults to ``fc.weight``'s rows (else 1000).

  Raises a ValueError listing every missing key, unexpected key and shape mismatch.
  """
  _arch(arch)
  if num_classes is None:
    num_classes = head_rows(state_dict, "fc") or IMAGENET_CLASSES
  model = model_for(arch, num_classes, dtype=dtype, width=width, unroll=unroll)
  return model, variables_from_state_dict(model, state_dict, arch)


def head_rows(state_dict: Mapping[str, Any], head: str) -> int | None:
  """Classes of the state dict's classifier ``head`` (None if it has no 2-d ``head.weight``)."""
  w = state_dict.get(f"{head}.weight")
  return int(np.shape(w)[0]) if w is not None and np.ndim(w) == 2 else None


def variables_from_state_dict(model: models.ResNet, state_dict: Mapping[str, Any], name: str,
                              head: str = "fc") -> dict:
  """{"params", "batch_stats"} (float32 numpy) of ``model`` from a torch-named state dict
  (``head``: the classifier's module name). ``name`` names the network in errors.

  Raises a ValueError listing every missing key, unexpected key and shape mismatch.
  """
  entries = _mapping(model, head)
  expected = {key: _torch_shape(kind, shape) for key, _, _, kind, shape in entries}
  bn_prefixes = {k[:-len(".running_mean")] for k in expected if k.endswith(".running_mean")}

  missing = sorted(k for k in expected if k not in state_dict)
  unexpected = sorted(
      k for k in state_dict if k not in expected
      and not (k.endswith(".num_batches_tracked")
               and k[:-len(".num_batches_tracked")] in bn_prefixes))
  mismatched = sorted(
      (k, expected[k], tuple(np.shape(state_dict[k])))
      for k in expected if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k])
  if missing or unexpected or mismatched:
    lines = [f"the state dict does not match {name} (width {model.widths[0]}, "
             f"{model.num_classes} classes):"]
    if missing:
      lines.append(f"  {len(missing)} missing key(s): {', '.join(missing)}")
    if unexpected:
      lines.append(f"  {len(unexpected)} unexpected key(s): {', '.join(unexpected)}")
    if mismatched:
      lines.append(f"  {len(mismatched)} shape mismatch(es): " + ", ".join(
          f"{k} expected {e} got {g}" for k, e, g in mismatched))
    raise ValueError("\n".join(lines))

  flat: dict[tuple[str, ...], Any] = {}
  for key, path, index, kind, _ in entries:
    a = _from_torch(kind, _as_array(state_dict[key]).astype(np.float32))
    if index is None:
      flat[path] = a
    else:
      flat.setdefault(path, {})[index] = a
  flat = {p: (np.stack([v[i] for i in range(len(v))]) if isinstance(v, dict) else
              np.ascontiguousarray(v)) for p, v in flat.items()}
  variables = flax.traverse_util.unflatten_dict(flat)

  # Every leaf the model creates is filled, with its shape and dtype.
  abstract = flax.traverse_util.flatten_dict(_abstract_variables(model))
  got = {p: (a.shape, a.dtype) for p, a in flat.items()}
  want = {p: (a.shape, np.dtype(a.dtype)) for p, a in abstract.items()}
  if got != want:
    raise AssertionError(f"internal mapping error for {name}: "
                         f"{sorted(set(got.items()) ^ set(want.items()))}")
  return variables


def to_state_dict(arch: str, variables: Mapping[str, Any],
                  width: int | None = None) -> dict[str, np.ndarray]:
  """The torchvision-named state dict (float32, contiguous numpy) of ``arch``'s ``variables``."""
  _arch(arch)
  model = model_for(arch, head_classes(variables), width=width)
  return state_dict_from_variables(model, variables, arch)


def head_classes(variables: Mapping[str, Any]) -> int:
  """Classes of our ``variables``' head (a ValueError if they have none)."""
  head = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(variables))).get(
      ("params", "head", "kernel"))
  if head is None:
    raise ValueError("variables have no params/head/kernel: not a ResNet's variables")
  return int(np.shape(head)[-1])


def state_dict_from_variables(model: models.ResNet, variables: Mapping[str, Any], name: str,
                              head: str = "fc") -> dict[str, np.ndarray]:
  """The torch-named state dict (float32, contiguous numpy) of ``model``'s ``variables``."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(variables)))
  flat = {p: v for p, v in flat.items() if p[0] in ("params", "batch_stats")}
  abstract = flax.traverse_util.flatten_dict(_abstract_variables(model))
  missing = sorted("/".join(p) for p in abstract if p not in flat)
  unexpected = sorted("/".join(p) for p in flat if p not in abstract)
  mismatched = sorted(("/".join(p), tuple(abstract[p].shape), tuple(np.shape(flat[p])))
                      for p in abstract if p in flat and tuple(np.shape(flat[p])) != abstract[p].shape)
  if missing or unexpected or mismatched:
    raise ValueError(
        f"variables do not match {name} (width {model.widths[0]}): missing {missing}, "
        f"unexpected {unexpected}, shape mismatches (path, expected, got) {mismatched}")
  out = {}
  for key, path, index, kind, _ in _mapping(model, head):
    a = np.asarray(jax.device_get(flat[path]), np.float32)
    out[key] = np.ascontiguousarray(_to_torch(kind, a if index is None else a[index]))
  return out


# ---------------------------------------------------------------------------------------------
# Files.


# torch.save files: torchvision's (.pth, .pt) and the CIFAR ResNets' (.th).
TORCH_EXTENSIONS = (".pth", ".pt", ".th")


def load_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A state dict from ``.safetensors`` (numpy only) or ``.pth``/``.pt``/``.th`` (torch,
  weights only).

  Torch files are read with ``torch.load(weights_only=True)``: a file that needs a full
  unpickle (one holding arbitrary Python objects) is refused, since unpickling runs code from
  the file. A checkpoint dict wrapping the weights under ``state_dict`` or ``model`` is
  unwrapped, and DataParallel's ``module.`` prefix is stripped.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".safetensors",) + TORCH_EXTENSIONS:
    raise ValueError(f"unknown weights file type {ext or '(none)'!r} of {path}: expected "
                     f".safetensors, {', '.join(TORCH_EXTENSIONS[:-1])} or {TORCH_EXTENSIONS[-1]}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  if ext == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError("reading .safetensors needs the safetensors package: "
                        "pip install safetensors") from e
    _check_not_empty(path)
    try:
      return dict(load_file(path))
    except (TypeError, ValueError) as e:  # e.g. bfloat16, which numpy has no dtype for
      raise ValueError(f"could not read {path} with safetensors' numpy API ({e}); store the "
                       f"weights as float32 or float16") from e
    except Exception as e:  # noqa: BLE001 (SafetensorError: a damaged or foreign file)
      raise ValueError(f"{path} is not a readable .safetensors file (damaged, cut short or "
                       f"another format): {' '.join(str(e).split())}") from e
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {ext} files needs PyTorch (pip install torch); or convert "
                      f"{path} to .safetensors, which needs only numpy") from e
  _check_torch_file(path)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(
        f"refusing to load {path}: it is not a plain weights file. torch.load(weights_only=True) "
        f"rejected it because it needs a full unpickle (it holds Python objects other than "
        f"tensors and containers), and unpickling can run arbitrary code from the file. "
        f"Export its state_dict() (ideally to .safetensors) and load that. "
        f"({' '.join(str(e).split())[:300]})") from e
  except Exception as e:  # noqa: BLE001 (a damaged archive: RuntimeError, EOFError, ...)
    raise ValueError(f"{path} is not a readable PyTorch file (damaged or cut short): "
                     f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
  if bad:
    raise ValueError(f"{path}: these entries are not tensors: {', '.join(bad)}")
  out = {}
  for k, v in obj.items():
    k = k[len("module."):] if k.startswith("module.") else k
    v = v.detach().cpu()
    out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
  return out


def _check_not_empty(path: str) -> None:
  if os.path.getsize(path) == 0:
    raise ValueError(f"{path} is empty (0 bytes): not a weights file (a copy cut short?)")


def _check_torch_file(path: str) -> None:
  """A torch.save file is a zip archive (PyTorch >= 1.6: it starts with "PK") or a pickle
  (older: its first byte is pickle's PROTO opcode); anything else is damaged or another format, which torch would
  report as a pickle needing a full unpickle."""
  _check_not_empty(path)
  with open(path, "rb") as f:
    head = f.read(2)
  if head != b"PK" and head[:1] != b"\x80":  # a zip's signature, pickle's PROTO
    raise ValueError(f"{path} is not a PyTorch file (neither torch.save's zip archive nor a "
                     "pickle): damaged, cut short or another format")


def load_pretrained(arch: str, path: str | os.PathLike, **kwargs) -> tuple[models.ResNet, dict]:
  """``from_state_dict(arch, load_weights(path))`` (CIFAR ResNets: ``pretrained_cifar``)."""
  return from_state_dict(arch, load_weights(path), **kwargs)
