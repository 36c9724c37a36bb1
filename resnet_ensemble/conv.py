"""Convolutions whose weight gradient is computed in slices of the batch (on the CPU).

XLA's CPU backend computes a convolution's weight gradient as one convolution whose window is
the whole image and whose contraction runs over every image of the batch: its im2col buffer
grows with the batch (75 MB for 128 CIFAR images at 16 channels), falls out of the cache, and
the weight gradient costs 5-10x PyTorch's (BUILD_NOTES, "Speed on the CPU"). The same sum
taken over slices of the batch whose buffers hold at most ``SLICE_BYTES`` stays in the cache:
3.5x faster at 16 channels, the same numbers up to float32 rounding. A batch whose buffer is
that small already is left whole (tiny models compile as before). The forward pass and the
input gradient are XLA's own (slicing them gains nothing).

``make_conv_fn(platform)`` says which function a layer uses: this one on the CPU,
``lax.conv_general_dilated`` elsewhere (a GPU's cuDNN has no such cliff). ``loops_are_slow``
says the CPU's other cliff once: convolutions' backward inside a compiled loop.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

SLICE_BYTES = 8 << 20   # im2col bytes per slice (8-16 CIFAR images at 16 channels: fastest)
MAX_SLICES = 32         # the slices are unrolled into the program: beyond this, larger slices


def _slices(batch: int, bytes_per_example: int) -> list[slice]:
  """Slices of the batch whose weight-gradient buffers hold at most ``SLICE_BYTES``."""
  need = max(1, min(batch, -(-batch * bytes_per_example // SLICE_BYTES)))
  n = next((d for d in range(need, MAX_SLICES + 1) if batch % d == 0), min(need, MAX_SLICES))
  size = -(-batch // n)   # equal slices where a divisor of the batch allows
  return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]


def _im2col_bytes(x: Array, w: Array, dims, strides) -> int:
  """Bytes of one example's im2col rows: output pixels x kernel taps x input channels."""
  pixels = math.prod(-(-x.shape[d] // s) for d, s in zip(dims.lhs_spec[2:], strides))
  taps = math.prod(w.shape[d] for d in dims.rhs_spec[2:])
  return pixels * taps * w.shape[dims.rhs_spec[1]] * x.dtype.itemsize


def sliced_weight_grad_conv(lhs: Array, rhs: Array, window_strides, padding, **kwargs) -> Array:
  """``lax.conv_general_dilated`` with the weight gradient summed over slices of the batch."""
  conv = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                           padding=padding, **kwargs)
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, kwargs.get("dimension_numbers"))
  batch_axis = dims.lhs_spec[0]
  slices = _slices(lhs.shape[batch_axis], _im2col_bytes(lhs, rhs, dims, window_strides))
  if len(slices) == 1:
    return conv(lhs, rhs)

  @jax.custom_vjp
  def f(x, w):
    return conv(x, w)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    dx = jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
    dw = jnp.zeros(w.shape, jnp.float32)
    for s in slices:
      x_s, g_s = (lax.slice_in_dim(a, s.start, s.stop, axis=batch_axis) for a in (x, g))
      dw = dw + jax.vjp(lambda w: conv(x_s, w), w)[1](g_s)[0].astype(jnp.float32)
    return dx, dw.astype(w.dtype)

  f.defvjp(fwd, bwd)
  return f(lhs, rhs)


def loops_are_slow(platform: str | None = None) -> bool:
  """Does a convolution's backward inside a compiled loop (``scan``, ``while``) run on a slow
  path on ``platform`` (default: JAX's default backend)? On the CPU it does: XLA does not give
  a loop body's backward convolutions the layout its fast kernels take, and they ran 10-40x
  slower than the same convolutions outside a loop (BUILD_NOTES, "Speed on the CPU"). So on
  the CPU the block scans are unrolled (``models.scan_unroll``) and the steps of a training
  call run one compiled step at a time (``feeds.ResidentFeed.train``)."""
  return (platform or jax.default_backend()) == "cpu"


def make_conv_fn(platform: str | None = None) -> Callable[..., Array]:
  """The convolution a layer computes with on ``platform`` (default: JAX's default backend)."""
  return sliced_weight_grad_conv if loops_are_slow(platform) else lax.conv_general_dilated
