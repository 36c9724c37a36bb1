"""One data-parallel mesh over every device of every host.

Batches (and, in the analyses, gate vectors and sampled paths) are split on the 'data' axis;
parameters and the small resident datasets are replicated. Under ``jax.jit`` the model sees the
global batch, so BatchNorm statistics are those of the whole global batch on any number of
devices (XLA inserts the cross-device reductions): 1 and 8 devices compute the same function.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """Split dimension ``axis`` over the data axis, replicate the rest."""
  return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


def check_divisible(size: int, mesh: Mesh, what: str) -> None:
  if size % mesh.size:
    raise ValueError(f"{what} = {size} must be divisible by the number of devices ({mesh.size})")
