"""One data-parallel mesh over every device of every host.

Batches (and, in the analyses, gate vectors and sampled paths) are split on the 'data' axis;
parameters and the small resident datasets are replicated. Under ``jax.jit`` the model sees the
global batch, so BatchNorm statistics are those of the whole global batch on any number of
devices (XLA inserts the cross-device reductions): 1 and 8 devices compute the same function.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

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


def put(value, sharding: NamedSharding) -> jax.Array:
  """A host value (the same on every process) as a global array with ``sharding``.

  Unlike ``jax.device_put`` this also works when the mesh spans several processes: each
  process fills only its own devices' shards."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate_local(local, mesh: Mesh, axis: int = 0) -> jax.Array:
  """A streamed batch whole on every device: its ``axis`` is every process's ``local`` share in
  process order (with one process, ``local`` is the batch)."""
  if jax.process_count() == 1:
    return put(local, replicated(mesh))
  spread = jax.make_array_from_process_local_data(sharded(mesh, axis), np.asarray(local))
  return _gather(mesh)(spread)


@functools.cache
def _gather(mesh: Mesh):
  return jax.jit(lambda a: a, out_shardings=replicated(mesh))


def put_tree(tree, sharding: NamedSharding):
  return jax.tree.map(lambda v: v if isinstance(v, jax.Array) and v.sharding == sharding
                      else put(v, sharding), tree)


def on_host(fn: Callable[[], Any]) -> Any:
  """``jax.jit(fn)()`` computed on this process's CPU; place the result with ``put_tree``.

  For parameter initialisation: one random draw per parameter makes a long program that XLA
  compiles in seconds for the CPU but takes close to a minute for a GPU; every
  process computes the same values, so the placed arrays agree across hosts. Where the CPU
  backend is switched off (``JAX_PLATFORMS=tpu``), on the default device instead."""
  try:
    host = jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # no CPU platform in this process
    return jax.jit(fn)()
  with jax.default_device(host):
    return jax.jit(fn)()


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           auto: bool = False) -> None:
  """Joins the JAX multi-process runtime when launched on several hosts.

  ``auto``: Cloud TPU (and SLURM/Open MPI) environments, where ``jax.distributed.initialize()``
  discovers everything itself. Otherwise a coordinator address, process count and id (flags or
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``). Nothing to do
  for a single process."""
  import os
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if auto and not coordinator_address:
    jax.distributed.initialize()
  elif coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs --num_processes and --process_id (or "
                       "JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
