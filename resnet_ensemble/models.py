"""Gated residual networks (and the plain VGG-style network) in Flax Linen.

Every block computes ``y = shortcut(x) + gate * f(x)``; the gates are a run-time array of shape
``(n_blocks,)`` or ``(n_blocks, batch)``, so deleting, reordering or sampling blocks never
builds a new model or recompiles. A plain (no-skip) layer computes ``y = x + gate * (f(x) - x)``:
with a zero gate it becomes the identity, the plain-network analogue of deleting a block.

The same-shape blocks of a stage are stacked on a leading parameter axis and run with
``nn.scan`` (see layout.py); ``unroll`` trades compile time for speed on accelerators.

``skip_compute=True`` puts each block behind a ``lax.cond``: a block whose gate is zero for the
whole batch computes only its shortcut. When to ask for it is ``should_skip``'s one decision.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_ensemble.layout import BlockLayout, down_name, stacked_name

Array = jax.Array
ModuleDef = Any

# He-normal with fan-out, as in torchvision; a block's last BN starts at one (no zero-init),
# so deleting a block at initialisation is not trivially free.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, name: str, dtype) -> nn.Conv:
  # Explicit symmetric padding (PyTorch's), not 'SAME': identical to torchvision at stride 2.
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


def _broadcast_gate(gate: Array, like: Array) -> Array:
  """A gate of shape () or (batch,) broadcast against an NHWC tensor."""
  gate = gate.astype(like.dtype)
  return gate.reshape(gate.shape + (1,) * (like.ndim - gate.ndim))


class BatchNorm(nn.BatchNorm):
  """``nn.BatchNorm`` whose running statistics move only where ``live`` is true.

  A residual branch gated off for the whole batch passes ``live=False``: its output is
  multiplied by zero, and its statistics stay as if it had not run (what the skipped form
  does), so every form of a gated step leaves the same state. ``live`` is reduced over
  ``axis_name`` (the convolution groups' vmap axis), so the groups agree on it."""

  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               live: Array | None = None, **kwargs) -> Array:
    frozen = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    gated = live is not None and not frozen and not self.is_initializing()
    old = {k: self.get_variable("batch_stats", k) for k in ("mean", "var")} if gated else {}
    y = super().__call__(x, use_running_average, **kwargs)
    if gated:
      if self.axis_name is not None:
        live = jax.lax.psum(live.astype(jnp.int32), self.axis_name) > 0
      for k, v in old.items():
        self.put_variable("batch_stats", k, jnp.where(live, self.get_variable("batch_stats", k), v))
    return y


def _computed(block: nn.Module, x: Array, gate: Array) -> Array:
  """The multiply form every block computes: ``merge(s(x) + gate * f(x))``; a gate that is
  zero for the whole batch leaves f's BN statistics alone (``BatchNorm``)."""
  s, f = block.branches(x, live=jnp.any(gate != 0))
  return block.merge(s + _broadcast_gate(gate, f) * f)


def should_skip(requested: bool, *, sampled: bool, vmapped: bool) -> bool:
  """Whether a gated-off block is skipped (``lax.cond``) rather than multiplied by zero.

  The two forms give the same outputs, gradients and BN statistics (a gated-off branch's
  statistics do not move in either: Huang et al.'s dropped block; tests/test_skip.py), so this
  is a choice of speed alone, made here once. Skip only when the config asks
  (``gates.skip_compute``), when gates are sampled per step (an analysis's fixed gates gain
  nothing from a cond), and never under a ``vmap`` whose members may disagree on a block (runs
  of a stack, grouped slices with per-example gates): there the cond becomes a select that
  computes both branches, and the multiply form is as fast without the conds. Skipping pays
  where a dropped block's FLOPs dominate (a CPU, or an effective-path step keeping few
  blocks); on a GPU each cond also costs a host round trip, so the multiply form wins once
  most blocks run (stochastic depth)."""
  return requested and sampled and not vmapped


def _skipped(block: nn.Module, x: Array, gate: Array) -> Array:
  """A block gated off for the whole batch: ``merge(s(x))``, f neither computed nor its BN
  statistics updated (equal to the multiply form's output with a zero gate)."""
  del gate
  return block.merge(block.branches(x, residual=False)[0])


def _gated_block(block: nn.Module, x: Array, gate: Array, skip_compute: bool) -> Array:
  """``merge(s(x) + gate * f(x))``; with ``skip_compute`` a ``lax.cond`` runs only the shortcut
  when the gate is zero for every example, so under jit the residual branch's work is skipped.
  Not at init: the skipped branch does not create f's variables."""
  if skip_compute and not block.is_initializing():
    y = nn.cond(jnp.all(gate == 0), _skipped, _computed, block, x, gate)
  else:
    y = _computed(block, x, gate)
  stream = getattr(block, "stream_dtype", None)
  return y if stream is None else y.astype(stream)


def _branch_norm(norm: ModuleDef, name: str, x: Array, live: Array | None) -> Array:
  """``norm(name=name)(x)``, passing ``live`` to a ``BatchNorm`` (other norms keep no
  running statistics to hold, or do not know the argument)."""
  module = norm(name=name)
  return module(x, live=live) if live is not None and isinstance(module, BatchNorm) else module(x)


def _zero_pad_shortcut(x: Array, features: int, stride: int) -> Array:
  """Option A: subsample spatially, zero-pad the new channels evenly on both sides."""
  x = x[:, ::stride, ::stride, :]
  extra = features - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class _ResidualBlock(nn.Module):
  """What every residual block shares: ``y = merge(s(x) + gate * f(x))`` and its shortcut.

  Subclasses define the fields below and ``branches(x, residual=True) -> (s(x), f(x))``; with
  ``residual=False`` only s(x) is computed (f is None): the block skipped."""

  features: int
  stride: int = 1
  down: bool = False          # does this block change the shape (needs a non-identity shortcut)?
  preact: bool = True
  shortcut: str = "projection"  # or "zero_pad" (option A)
  norm: ModuleDef = BatchNorm
  dtype: Any = jnp.float32
  stream_dtype: Any = None    # the output's dtype (ResNet.stream_dtype); None: as computed

  def __call__(self, x: Array, gate: Array, skip_compute: bool = False) -> Array:
    return _gated_block(self, x, gate, skip_compute)

  @nn.nowrap
  def merge(self, z: Array) -> Array:
    """What follows the addition: nothing (pre-activation) or a ReLU (post-activation)."""
    return z if self.preact else nn.relu(z)

  @nn.nowrap
  def _bn(self, name: str, x: Array, live: Array | None) -> Array:
    """The norm ``name`` of the residual branch: its statistics move only where ``live``."""
    return _branch_norm(self.norm, name, x, live)

  @property
  def _projects(self) -> bool:
    """Is the shortcut a projection (the pre-activation one shares f's first BN-ReLU)?"""
    return self.down and self.shortcut != "zero_pad"

  def _shortcut(self, x: Array, h: Array, out: int) -> Array:
    """Identity, or for a downsampling block a projection of ``h`` (the pre-activated input in
    the pre-activation form, as in He et al.'s code) or option A's zero padding of ``x``."""
    if not self.down:
      return x
    if self.shortcut == "zero_pad":
      return _zero_pad_shortcut(x, out, self.stride)
    s = _conv(out, 1, self.stride, "proj_conv", self.dtype)(h)
    return s if self.preact else self.norm(name="proj_bn")(s)

  def _shortcut_alone(self, x: Array, out: int) -> Array:
    """s(x) of a skipped block. Only a pre-activation projection needs the BN-ReLU it shares
    with f (so that BN's statistics still update, as the shortcut is computed)."""
    h = nn.relu(self.norm(name="bn1")(x)) if self.preact and self._projects else x
    return self._shortcut(x, h, out)

  @nn.nowrap
  def _first_bn(self, x: Array, live: Array | None) -> Array:
    """Pre-activation's first BN-ReLU; shared with a projection shortcut, which always runs."""
    return nn.relu(self._bn("bn1", x, None if self._projects else live))


class BasicBlock(_ResidualBlock):
  """Two 3x3 convolutions; pre-activation (He et al. 2016b) or the original post-activation."""

  @nn.compact
  def branches(self, x: Array, residual: bool = True,
               live: Array | None = None) -> tuple[Array, Array | None]:
    """(shortcut s(x), residual f(x)): the two ways a path can go through this block.
    ``live``: does f count for the batch (its BN statistics move only if so)?"""
    conv = functools.partial(_conv, dtype=self.dtype)
    if not residual:
      return self._shortcut_alone(x, self.features), None
    if self.preact:
      h = self._first_bn(x, live)
      f = conv(self.features, 3, self.stride, "conv1")(h)
      f = nn.relu(self._bn("bn2", f, live))
      return self._shortcut(x, h, self.features), conv(self.features, 3, 1, "conv2")(f)
    f = conv(self.features, 3, self.stride, "conv1")(x)
    f = nn.relu(self._bn("bn1", f, live))
    f = conv(self.features, 3, 1, "conv2")(f)
    return self._shortcut(x, x, self.features), self._bn("bn2", f, live)


class BottleneckBlock(_ResidualBlock):
  """1x1 - 3x3 - 1x1 bottleneck (ImageNet ResNet-50..200); stride on the 3x3 (torchvision).
  ``features`` is the bottleneck width; the output has ``expansion`` (4) times as many."""

  expansion: int = 4

  @nn.compact
  def branches(self, x: Array, residual: bool = True,
               live: Array | None = None) -> tuple[Array, Array | None]:
    conv = functools.partial(_conv, dtype=self.dtype)
    out = self.features * self.expansion
    if not residual:
      return self._shortcut_alone(x, out), None
    if self.preact:
      h = self._first_bn(x, live)
      f = conv(self.features, 1, 1, "conv1")(h)
      f = nn.relu(self._bn("bn2", f, live))
      f = conv(self.features, 3, self.stride, "conv2")(f)
      f = nn.relu(self._bn("bn3", f, live))
      return self._shortcut(x, h, out), conv(out, 1, 1, "conv3")(f)
    f = nn.relu(self._bn("bn1", conv(self.features, 1, 1, "conv1")(x), live))
    f = nn.relu(self._bn("bn2", conv(self.features, 3, self.stride, "conv2")(f), live))
    return self._shortcut(x, x, out), self._bn("bn3", conv(out, 1, 1, "conv3")(f), live)


class PlainLayer(nn.Module):
  """conv-BN-ReLU with no skip; a zero gate turns it into the identity (a deleted layer)."""

  features: int
  norm: ModuleDef = BatchNorm
  dtype: Any = jnp.float32

  def __call__(self, x: Array, gate: Array, skip_compute: bool = False) -> Array:
    return _gated_block(self, x, gate, skip_compute)

  @nn.nowrap
  def merge(self, z: Array) -> Array:
    return z

  @nn.compact
  def branches(self, x: Array, residual: bool = True,
               live: Array | None = None) -> tuple[Array, Array | None]:
    """Skip = identity, enter = the change the layer makes, f(x) - x."""
    if not residual:
      return x, None
    f = _conv(self.features, 3, 1, "conv", self.dtype)(x)
    return x, nn.relu(_branch_norm(self.norm, "bn", f, live)) - x


def _scan_blocks(block: nn.Module, x: Array, gates: Array, unroll: int,
                 skip_compute: bool = False) -> Array:
  """Runs ``len(gates)`` copies of ``block`` (stacked params and batch stats) in sequence; with
  ``skip_compute`` each step's cond decides on its own block's gate."""

  def body(mdl, carry, gate):
    return mdl(carry, gate, skip_compute), None

  scan = nn.scan(body, variable_axes={"params": 0, "batch_stats": 0},
                 split_rngs={"params": True}, in_axes=0, length=gates.shape[0],
                 unroll=gates.shape[0] if unroll <= 0 else min(unroll, gates.shape[0]))
  return scan(block, x, gates)[0]


def _check_gates(gates: Array | None, n_blocks: int, batch: int, dtype) -> Array:
  if gates is None:
    return jnp.ones((n_blocks,), dtype)
  gates = jnp.asarray(gates)
  if gates.ndim not in (1, 2) or gates.shape[0] != n_blocks:
    raise ValueError(
        f"gates must have shape ({n_blocks},) or ({n_blocks}, batch) for this network of "
        f"{n_blocks} blocks; got shape {gates.shape}")
  if gates.ndim == 2 and gates.shape[1] != batch:
    raise ValueError(f"per-example gates have batch size {gates.shape[1]}, the input has {batch}")
  return gates


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
  unroll: int = 1                      # scan unroll factor; <= 0 means fully unrolled
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
    gates = _check_gates(gates, layout.n_blocks, x.shape[0], self.dtype)
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
      x = _conv(stem_width, 7, 2, "stem_conv", self.dtype)(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
      return x.astype(self.stream_dtype or self.dtype)
    x = _conv(stem_width, 3, 1, "stem_conv", self.dtype)(x)
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
  unroll: int = 1
  norm_axis_name: str | None = None    # BatchNorm statistics also over this vmap/pmap axis

  @property
  def layout(self) -> BlockLayout:
    return BlockLayout(tuple(self.stage_sizes), (False,) * len(self.stage_sizes))

  @nn.compact
  def __call__(self, x: Array, gates: Array | None = None, train: bool = False,
               skip_compute: bool = False) -> Array:
    layout = self.layout
    gates = _check_gates(gates, layout.n_blocks, x.shape[0], self.dtype)
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
    x = _conv(self.width, 3, 1, "stem_conv", self.dtype)(x.astype(self.dtype))
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


class _Part(nn.Module):
  """Runs ``fn(x)`` in a compact scope, so the parameter names ``fn`` creates match the ones the
  whole network's ``__call__`` creates (used to apply the stem or head on their own)."""

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


def unroll(model: "ResNet | PlainNet", variables) -> Unrolled:
  """The per-block view of ``model`` with ``variables`` (for routed gradients, E6)."""
  norm = _norm(False, model.dtype)
  params, stats = variables["params"], variables.get("batch_stats", {})

  def sub(name, index=None):
    tree = {"params": params[name]}
    if name in stats:
      tree["batch_stats"] = stats[name]
    return tree if index is None else jax.tree.map(lambda a: a[index], tree)

  def part(fn, names):
    tree = {"params": {k: params[k] for k in names if k in params},
            "batch_stats": {k: stats[k] for k in names if k in stats}}
    return functools.partial(_Part(fn).apply, tree)

  layout = model.layout
  branches, merges = [], []
  for s, down, stacked in model.stage_blocks(norm):
    enter = functools.partial(model.enter_stage, s) if hasattr(model, "enter_stage") else None
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
