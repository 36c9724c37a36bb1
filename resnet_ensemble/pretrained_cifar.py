"""The standard PyTorch CIFAR ResNets (He et al.'s original form) as gated Flax models.

The CIFAR ResNets most used in PyTorch (``resnet20/32/44/56/110/1202``, published with weights
trained on the real CIFAR-10) are post-activation basic blocks of widths 16/32/64 with a 3x3
conv-BN-ReLU stem and option-A shortcuts: a downsampling block's shortcut takes every second
pixel and pads the missing channels with zeros, half before and half after the existing ones.
That is exactly ``models.ResNet(preact=False, shortcut="zero_pad")`` (whose zero channels also
go evenly on both sides), so the import is a renaming and every analysis runs unchanged:

    theirs (state_dict, ``module.`` stripped)   ours (params / batch_stats)
    conv1.weight (O,I,H,W)                      stem_conv/kernel (H,W,I,O)
    bn1.*                                       stem_bn/*
    layer1.{j}.*                                stage0_blocks/*[j] (no shape change)
    layer{s+1}.0.*, s = 1, 2                    stage{s}_down/*
    layer{s+1}.{j}.*, j >= 1                    stage{s}_blocks/*[j - 1]
      .conv{i}.weight, .bn{i}.*                   conv{i}/kernel, bn{i}/...
    linear.weight (out,in), linear.bias         head/kernel (in,out), head/bias

The networks were trained on ``ToTensor()`` pixels normalised with ImageNet's mean and std,
not CIFAR-10's own (``INPUT_MEAN``/``INPUT_STD``, in 0..255 units: configs set ``data.mean``
and ``data.std`` to them).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from resnet_ensemble import models, pretrained

# arch -> blocks per stage (depth = 6n + 2).
ARCHS: dict[str, int] = {f"resnet{6 * n + 2}": n for n in (3, 5, 7, 9, 18, 200)}
AUTO = "cifar"  # the arch whose depth is read from the weights file
CLASSES = 10
HEAD = "linear"
WIDTH = 16

# The input normalisation these networks were trained with: ImageNet's per-channel mean and
# std of [0, 1] pixels, here times 255 (the units of data.mean / data.std).
INPUT_MEAN = tuple(255.0 * m for m in (0.485, 0.456, 0.406))
INPUT_STD = tuple(255.0 * s for s in (0.229, 0.224, 0.225))


def is_cifar_arch(arch: str) -> bool:
  return arch == AUTO or arch in ARCHS


def _blocks_per_stage(arch: str) -> int:
  if arch not in ARCHS:
    raise ValueError(f"unknown CIFAR ResNet arch {arch!r}; supported: {AUTO} (depth from the "
                     f"file), {', '.join(ARCHS)}")
  return ARCHS[arch]


def model_for(arch: str, num_classes: int = CLASSES, dtype: Any = jnp.float32,
              width: int | None = None, unroll: int = -1) -> models.ResNet:
  """The gated post-activation option-A ResNet of ``arch`` (``width``: first stage's, 16)."""
  n, w = _blocks_per_stage(arch), width or WIDTH
  return models.ResNet(stage_sizes=(n, n, n), widths=(w, 2 * w, 4 * w), block="basic",
                       stem="cifar", preact=False, shortcut="zero_pad", num_classes=num_classes,
                       dtype=dtype, unroll=unroll)


def expected_shapes(arch: str, num_classes: int = CLASSES,
                    width: int | None = None) -> dict[str, tuple[int, ...]]:
  """Their key -> shape of every tensor ``arch``'s state dict holds, in their order."""
  model = model_for(arch, num_classes, width=width)
  return {key: pretrained._torch_shape(kind, shape)
          for key, _, _, kind, shape in pretrained._mapping(model, HEAD)}


def arch_of(state_dict: Mapping[str, Any]) -> str:
  """The arch a state dict holds, from its ``layer1`` blocks (the stages have equal depth)."""
  blocks = {int(m.group(1)) for k in state_dict
            if (m := re.match(r"layer1\.(\d+)\.conv1\.weight$", k))}
  if not blocks or blocks != set(range(len(blocks))):
    raise ValueError("the state dict is not a CIFAR ResNet's: no layer1.{0..n-1}.conv1.weight "
                     f"tensors (its first keys: {', '.join(list(state_dict)[:5])})")
  arch = f"resnet{6 * len(blocks) + 2}"
  if arch not in ARCHS:
    raise ValueError(f"the state dict has {len(blocks)} blocks in layer1, i.e. {arch}, not one "
                     f"of {', '.join(ARCHS)}")
  return arch


def from_state_dict(arch: str, state_dict: Mapping[str, Any], num_classes: int | None = None,
                    width: int | None = None, dtype: Any = jnp.float32,
                    unroll: int = -1) -> tuple[models.ResNet, dict]:
  """(gated Flax model, float32 numpy variables) from their state dict of ``arch`` (``cifar``:
  the arch the dict holds). A dict of another arch or width is a ValueError naming every
  missing, unexpected and misshapen tensor."""
  if arch == AUTO:
    arch = arch_of(state_dict)
  _blocks_per_stage(arch)
  if width is None:
    stem = state_dict.get("conv1.weight")
    width = int(np.shape(stem)[0]) if stem is not None and np.ndim(stem) == 4 else None
  if num_classes is None:
    num_classes = pretrained.head_rows(state_dict, HEAD) or CLASSES
  model = model_for(arch, num_classes, dtype=dtype, width=width, unroll=unroll)
  return model, pretrained.variables_from_state_dict(model, state_dict, arch, HEAD)


def to_state_dict(arch: str, variables: Mapping[str, Any],
                  width: int | None = None) -> dict[str, np.ndarray]:
  """Their state dict (float32 numpy, no ``module.`` prefix) of ``arch``'s ``variables``."""
  model = model_for(arch, pretrained.head_classes(variables), width=width)
  return pretrained.state_dict_from_variables(model, variables, arch, HEAD)


def load_pretrained(arch: str, path: str | os.PathLike, **kwargs) -> tuple[models.ResNet, dict]:
  """A ``.th`` checkpoint as published, a ``.pth``/``.pt`` or a ``.safetensors`` of the same
  state dict (``pretrained.load_weights``: never a full unpickle) as the gated Flax model."""
  return from_state_dict(arch, pretrained.load_weights(path), **kwargs)
