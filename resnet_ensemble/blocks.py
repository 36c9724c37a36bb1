"""The gated blocks every network here is made of, and when a gated-off block is skipped.

Every block computes ``y = merge(shortcut(x) + gate * f(x))``; a plain (no-skip) layer computes
``y = x + gate * (f(x) - x)``: with a zero gate it becomes the identity, the plain-network
analogue of deleting a block. ``skip_compute=True`` puts a block behind a ``lax.cond``: a block
whose gate is zero for the whole batch computes only its shortcut (``should_skip`` decides when
that is worth asking for).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_ensemble import conv

Array = jax.Array
ModuleDef = Any

# He-normal with fan-out, as in torchvision; a block's last BN starts at one (no zero-init),
# so deleting a block at initialisation is not trivially free.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_conv(features: int, kernel: int, stride: int, name: str, dtype) -> nn.Conv:
  # Explicit symmetric padding (PyTorch's), not 'SAME': identical to torchvision at stride 2.
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=conv_init, dtype=dtype, name=name,
                 conv_general_dilated=conv.make_conv_fn())


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
    s = make_conv(out, 1, self.stride, "proj_conv", self.dtype)(h)
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
    conv = functools.partial(make_conv, dtype=self.dtype)
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
    conv = functools.partial(make_conv, dtype=self.dtype)
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
    f = make_conv(self.features, 3, 1, "conv", self.dtype)(x)
    return x, nn.relu(_branch_norm(self.norm, "bn", f, live)) - x
