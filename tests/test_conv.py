"""The CPU convolution (weight gradient summed over slices of the batch) is the same function
with the same gradients as ``lax.conv_general_dilated``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_ensemble import conv, models


@pytest.fixture
def small_slices(monkeypatch):
  """One image per slice even for tiny tensors, so the sliced path really runs."""
  monkeypatch.setattr(conv, "SLICE_BYTES", 1)


def test_slices_cover_the_batch_equally():
  assert [s.stop - s.start for s in conv._slices(128, 32 * 32 * 9 * 16 * 4)] == [8] * 16
  assert conv._slices(64, 100) == [slice(0, 64)]              # small buffers: one slice
  sizes = [s.stop - s.start for s in conv._slices(1000, 10 << 20)]
  assert sum(sizes) == 1000 and len(sizes) <= conv.MAX_SLICES


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 2)])
def test_sliced_gradients_equal_xla(small_slices, stride, groups):
  x = jax.random.normal(jax.random.key(0), (12, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4 // groups, 6))
  kw = dict(window_strides=(stride, stride), padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  assert len(conv._slices(12, conv._im2col_bytes(
      x, w, lax.conv_dimension_numbers(x.shape, w.shape, kw["dimension_numbers"]),
      (stride, stride)))) > 1
  loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w, **kw))))
  ref = jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1))(x, w)
  got = jax.jit(jax.grad(loss(conv.sliced_weight_grad_conv), argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(conv.sliced_weight_grad_conv(x, w, **kw),
                             lax.conv_general_dilated(x, w, **kw), rtol=0, atol=0)
  for r, g in zip(ref, got):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_network_gradients_unchanged(small_slices, monkeypatch):
  """A ResNet's loss gradient (vmapped over two seeds, as a stack trains) with the sliced
  convolution equals the one with XLA's."""
  model = models.ResNet(stage_sizes=(1, 1, 1), widths=(4, 8, 16))
  x = jax.random.normal(jax.random.key(0), (10, 8, 8, 3))

  def grads():
    def one(key):
      v = model.init(key, x[:1])
      loss = lambda p: model.apply({**v, "params": p}, x, train=True,
                                   mutable=["batch_stats"])[0].sum()
      return jax.grad(loss)(v["params"])
    return jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), 2))

  # Each convolution chosen by hand, not by the platform, so the sliced one runs on any host.
  monkeypatch.setattr(conv, "make_conv_fn", lambda platform=None: conv.sliced_weight_grad_conv)
  got = grads()
  monkeypatch.setattr(conv, "make_conv_fn", lambda platform=None: lax.conv_general_dilated)
  ref = grads()
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), got, ref)


def test_platform_choice():
  assert conv.make_conv_fn("cpu") is conv.sliced_weight_grad_conv
  assert conv.make_conv_fn("gpu") is lax.conv_general_dilated
  assert models.scan_unroll(-1, 18, "cpu") == 18 and models.scan_unroll(-1, 18, "gpu") == 1
  assert models.scan_unroll(0, 18) == 18 and models.scan_unroll(4, 3) == 3
