"""Input preparation inside the jitted step: batch selection, pad-crop-flip, normalisation.

The training set stays on the device as uint8; which examples a step sees and how they are
augmented are pure functions of (seed, step), so a resumed run, or one on another number of
devices, sees exactly the same batches.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def batch_indices(key: jax.Array, step: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """Indices of step ``step``'s batch: epoch-wise permutations without replacement.

  Each epoch uses a fresh permutation (keyed by the epoch number) and drops the remainder.
  """
  steps_per_epoch = num_examples // batch_size
  epoch, position = jnp.divmod(step, steps_per_epoch)
  order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  return jax.lax.dynamic_slice_in_dim(order, position * batch_size, batch_size)


def random_crop_flip(key: jax.Array, images: jax.Array, padding: int, flip: bool) -> jax.Array:
  """Zero-pad by ``padding``, take a random crop of the original size, maybe flip left-right."""
  b, h, w, c = images.shape
  crop_key, flip_key = jax.random.split(key)
  if padding:
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * padding + 1)
    images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets)
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (b,))
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
  return images


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 (0..255) -> per-channel standardised float32."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std
