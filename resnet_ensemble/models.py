"""Gated residual networks (and the plain VGG-style network) in Flax Linen.

Every block computes ``y = shortcut(x) + gate * f(x)``; the gates are a run-time array of shape
``(n_blocks,)`` or ``(n_blocks, batch)``, so deleting, reordering or sampling blocks never
builds a new model or recompiles. A plain (no-skip) layer computes ``y = x + gate * (f(x) - x)``:
with a zero gate it becomes the identity, the plain-network analogue of deleting a block.

The same-shape blocks of a stage are stacked on a leading parameter axis and run with
``nn.scan`` (see layout.py); ``unroll`` trades compile time for speed on accelerators.

The blocks and the skip policy are in blocks.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_ensemble import blocks, conv, gates as gates_lib
from resnet_ensemble.blocks import BasicBlock, BatchNorm, BottleneckBlock, PlainLayer
from resnet_ensemble.layout import BlockLayout, down_name, stacked_name

Array = jax.Array
ModuleDef = Any

def scan_unroll(unroll: int, length: int, platform: str | None = None) -> int:
  """The unroll factor of a scan over ``length`` blocks: ``unroll`` > 0 as given (at most
  ``length``), 0 fully unrolled, < 0 chosen for the platform: fully unrolled on the CPU, whose
  backend runs a rolled loop's backward convolutions 10-40x slower (BUILD_NOTES, "Speed on the
  CPU"), rolled elsewhere (an accelerator compiles a rolled loop far faster)."""
  if unroll < 0:
    unroll = 0 if conv.loops_are_slow(platform) else 1
  return length if unroll == 0 else min(unroll, length)


def _scan_blocks(block: nn.Module, x: Array, gates: Array, unroll: int,
                 skip_compute: bool = False) -> Array:
  """Runs ``len(gates)`` copies of ``block`` (stacked params and batch stats) in sequence; with
  ``skip_compute`` each step's cond decides on its own block's gate."""

  def body(mdl, carry, gate):
    return mdl(carry, gate, skip_compute), None

  scan = nn.scan(body, variable_axes={"params": 0, "batch_stats": 0},
                 split_rngs={"params": True}, in_axes=0, length=gates.shape[0],
                 unroll=scan_unroll(unroll, gates.shape[0]))
  return scan(block, x, gates)[0]


class ResNet(nn.Module):
  """A gated residual network: CIFAR (3x3 stem) or ImageNet (7x7/2 stem + max-pool) style.

  ``__call__(x, gates=None, train=False, skip_compute=False)``; ``x`` is NHWC, already
  normalised. ``skip_compute``: blocks gated off for the whole batch are not computed.
  """

  stage_sizes: Sequence[int]
  widths: Sequence[int]                # per stage: block width (bottleneck: inner width)
  block: str = "basic"                 # "basic" | "bottleneck"
  stem: str = "cifar"                  # "cifar" | "imagenet"
  stem_width: int | None = None        # default: widths[0]
  preact: bool = True
  shortcut: str = "projection"         # "projection" | "zero_pad"
  num_classes: int = 10
  dtype: Any = jnp.float32
  # The identity path's dtype, between blocks: None = ``dtype``. With bf16 compute, float32
  # keeps the sum of 54 residuals at full precision while every branch still runs in bf16.
  stream_dtype: Any = None
  unroll: int = -1                     # scan unroll: k, 0 = fully, < 0 = by platform (scan_unroll)
  expansion: int | None = None         # bottleneck output / inner width (4; wide ResNets: 2)
  norm_axis_name: str | None = None    # BatchNorm statistics also over this vmap/pmap axis

  @property
  def _expansion(self) -> int:
    return (self.expansion or 4) if self.block == "bottleneck" else 1

  def _stage_strides(self) -> list[int]:
    return [1] + [2] * (len(self.stage_sizes) - 1)

  @property
  def layout(self) -> BlockLayout:
    channels = self.stem_width or self.widths[0]
    first_is_down = []
    for width, stride in zip(self.widths, self._stage_strides()):
      out = width * self._expansion
      first_is_down.append(stride != 1 or channels != out)
      channels = out
    return BlockLayout(tuple(self.stage_sizes), tuple(first_is_down))

  @nn.compact
  def __call__(self, x: Array, gates: Array | None = None, train: bool = False,
               skip_compute: bool = False) -> Array:
    layout = self.layout
    gates = gates_lib.check_shape(gates, layout.n_blocks, x.shape[0], self.dtype,
                                  f"for this network of {layout.n_blocks} blocks")
    norm = _norm(train, self.dtype, self.norm_axis_name)
    x = self.embed(x, norm)
    for s, down, stacked in self.stage_blocks(norm):
      stage = layout.stage_range(s)
      if down is not None:
        x = down(name=down_name(s))(x, gates[stage.start], skip_compute)
      r = layout.stacked_range(s)
      if len(r):
        x = _scan_blocks(stacked(name=stacked_name(s)), x, gates[r.start:r.stop], self.unroll,
                         skip_compute)
    return self.head(x, norm)

  @nn.nowrap
  def embed(self, x: Array, norm: ModuleDef) -> Array:
    """The stem: image -> input of the first block."""
    x = x.astype(self.dtype)
    stem_width = self.stem_width or self.widths[0]
    if self.stem == "imagenet":
      x = blocks.make_conv(stem_width, 7, 2, "stem_conv", self.dtype)(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
      return x.astype(self.stream_dtype or self.dtype)
    x = blocks.make_conv(stem_width, 3, 1, "stem_conv", self.dtype)(x)
    x = x if self.preact else nn.relu(norm(name="stem_bn")(x))
    return x.astype(self.stream_dtype or self.dtype)

  @nn.nowrap
  def stage_blocks(self, norm: ModuleDef):
    """Per stage: (index, downsampling-block factory or None, stacked-block factory)."""
    block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
    extra = {"expansion": self._expansion} if self.block == "bottleneck" else {}
    for s, (width, stride) in enumerate(zip(self.widths, self._stage_strides())):
      block = functools.partial(block_cls, features=width, preact=self.preact,
                                shortcut=self.shortcut, norm=norm, dtype=self.dtype,
                                stream_dtype=self.stream_dtype, **extra)
      down = functools.partial(block, stride=stride, down=True)
      yield s, down if self.layout.first_is_down[s] else None, block

  @nn.nowrap
  def head(self, x: Array, norm: ModuleDef) -> Array:
    """Output of the last block -> logits."""
    if self.preact:
      x = nn.relu(norm(name="final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def _norm(train: bool, dtype, axis_name: str | None = None) -> ModuleDef:
  return functools.partial(BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, dtype=dtype, axis_name=axis_name if train else None)


class PlainNet(nn.Module):
  """The plain "VGG-15" of the comparison: a 3x3 conv stem, gated conv-BN-ReLU layers of equal
  width in stages separated by 2x2 max-pooling, global average pooling and a dense layer
  (stem + 13 layers + dense = 15 weight layers with the default stages)."""

  stage_sizes: Sequence[int] = (5, 4, 4)
  width: int = 128
  num_classes: int = 10
  dtype: Any = jnp.float32
  unroll: int = -1
  norm_axis_name: str | None = None    # BatchNorm statistics also over this vmap/pmap axis

  @property
  def layout(self) -> BlockLayout:
    return BlockLayout(tuple(self.stage_sizes), (False,) * len(self.stage_sizes))

  @nn.compact
  def __call__(self, x: Array, gates: Array | None = None, train: bool = False,
               skip_compute: bool = False) -> Array:
    layout = self.layout
    gates = gates_lib.check_shape(gates, layout.n_blocks, x.shape[0], self.dtype,
                                  f"for this network of {layout.n_blocks} blocks")
    norm = _norm(train, self.dtype, self.norm_axis_name)
    x = self.embed(x, norm)
    for s, _, layer in self.stage_blocks(norm):
      x = self.enter_stage(s, x)
      r = layout.stacked_range(s)
      x = _scan_blocks(layer(name=stacked_name(s)), x, gates[r.start:r.stop], self.unroll,
                       skip_compute)
    return self.head(x, norm)

  @nn.nowrap
  def embed(self, x: Array, norm: ModuleDef) -> Array:
    x = blocks.make_conv(self.width, 3, 1, "stem_conv", self.dtype)(x.astype(self.dtype))
    return nn.relu(norm(name="stem_bn")(x))

  @nn.nowrap
  def stage_blocks(self, norm: ModuleDef):
    for s in range(len(self.stage_sizes)):
      yield s, None, functools.partial(PlainLayer, self.width, norm=norm, dtype=self.dtype)

  @nn.nowrap
  def enter_stage(self, stage: int, x: Array) -> Array:
    """2x2 max-pooling between stages (not a layer: nothing to delete)."""
    return nn.max_pool(x, (2, 2), (2, 2)) if stage > 0 else x

  @nn.nowrap
  def head(self, x: Array, norm: ModuleDef) -> Array:
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


class Part(nn.Module):
  """Runs ``fn(x)`` in a compact scope, so the parameter names ``fn`` creates match the ones the
  whole network's ``__call__`` creates (to apply a stem, an embedding or a head on its own)."""

  fn: Callable

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return self.fn(x)


@dataclasses.dataclass(frozen=True)
class Unrolled:
  """A trained network as embed -> blocks -> head, each a pure function (BN in inference
  mode). Block i maps y to its two branches (s_i(y), f_i(y)); y_i = merge_i(s_i + f_i)."""

  embed: Callable[[Array], Array]
  branches: tuple[Callable[[Array], tuple[Array, Array]], ...]
  merges: tuple[Callable[[Array], Array], ...]
  head: Callable[[Array], Array]


def variables_of(variables, name: str) -> dict:
  """The params (and BatchNorm statistics, where it has them) of the submodule ``name``."""
  tree = {"params": variables["params"][name]}
  stats = variables.get("batch_stats", {})
  if name in stats:
    tree["batch_stats"] = stats[name]
  return tree


def inference_stages(model: "ResNet | PlainNet"):
  """Per stage: (s, downsampling block or None, stacked block, enter_stage or None), each a
  module factory with BatchNorm in inference mode: the parts from which ``unroll`` (E6) and
  the shared-prefix lesion form rebuild the network."""
  norm = _norm(False, model.dtype)
  for s, down, stacked in model.stage_blocks(norm):
    enter = functools.partial(model.enter_stage, s) if hasattr(model, "enter_stage") else None
    yield s, down, stacked, enter


def unroll(model: "ResNet | PlainNet", variables) -> Unrolled:
  """The per-block view of ``model`` with ``variables`` (for routed gradients, E6)."""
  norm = _norm(False, model.dtype)
  params, stats = variables["params"], variables.get("batch_stats", {})

  def sub(name, index=None):
    tree = variables_of(variables, name)
    return tree if index is None else jax.tree.map(lambda a: a[index], tree)

  def part(fn, names):
    tree = {"params": {k: params[k] for k in names if k in params},
            "batch_stats": {k: stats[k] for k in names if k in stats}}
    return functools.partial(Part(fn).apply, tree)

  layout = model.layout
  branches, merges = [], []
  for s, down, stacked, enter in inference_stages(model):
    blocks = ([(down(), sub(down_name(s)))] if down is not None else []) + [
        (stacked(), sub(stacked_name(s), j)) for j in range(len(layout.stacked_range(s)))]
    for position, (block, tree) in enumerate(blocks):
      apply = functools.partial(block.apply, tree, method=block.branches)
      if enter is not None and position == 0:
        apply = lambda y, apply=apply, enter=enter: apply(enter(y))
      branches.append(apply)
      merges.append(block.merge)
  embed = part(lambda x: model.embed(x, norm), ("stem_conv", "stem_bn"))
  head = part(lambda x: model.head(x, norm), ("final_bn", "head"))
  return Unrolled(embed=embed, branches=tuple(branches), merges=tuple(merges), head=head)


IMAGENET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _choice(value: str, valid, what: str):
  if value not in valid:
    raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")
  return value


def build(model_config, num_classes: int) -> nn.Module:
  """The model named by ``config.model``: cifar_resnet | imagenet_resnet | plain."""
  c = model_config
  name = _choice(c.name, ("cifar_resnet", "imagenet_resnet", "plain"), "model name")
  dtype = _DTYPES[_choice(c.dtype, tuple(_DTYPES), "model dtype")]
  if name == "plain":
    return PlainNet(stage_sizes=tuple(c.plain_stages), width=c.width or 128,
                    num_classes=num_classes, dtype=dtype, unroll=c.unroll)
  _choice(c.block_form, ("preact", "postact"), "block form")
  _choice(c.shortcut, ("projection", "zero_pad"), "shortcut")
  stream = _DTYPES[_choice(c.stream_dtype, tuple(_DTYPES), "model stream_dtype")] \
      if c.get("stream_dtype") else None
  common = dict(preact=c.block_form == "preact", shortcut=c.shortcut, num_classes=num_classes,
                dtype=dtype, stream_dtype=stream, unroll=c.unroll)
  if name == "cifar_resnet":
    if c.depth < 8 or (c.depth - 2) % 6:
      raise ValueError(f"a CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, 56, 110, ...); got {c.depth}")
    n = (c.depth - 2) // 6
    w = c.width or 16
    return ResNet(stage_sizes=(n, n, n), widths=(w, 2 * w, 4 * w), block="basic", stem="cifar",
                  **common)
  block, stages = IMAGENET_STAGES[_choice(c.depth, tuple(IMAGENET_STAGES), "ImageNet ResNet depth")]
  w = c.width or 64
  return ResNet(stage_sizes=stages, widths=(w, 2 * w, 4 * w, 8 * w), block=block, stem="imagenet",
                **common)
