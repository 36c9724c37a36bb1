"""A run's training state: how it is made (alone or as one run of a stack) and the abstract
state a checkpoint is restored into."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_ensemble import config as config_lib, optim
from resnet_ensemble.stack import Run, RunStack


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state_unsharded(model: nn.Module, tx, seed: int | jax.Array,
                                 input_shape) -> TrainState:
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  variables = model.init(jax.random.fold_in(jax.random.key(seed), 0), x)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def create_train_state(model: nn.Module, tx, seed: int, input_shape, mesh) -> TrainState:
  """The initial state replicated over ``mesh``, initialised on the host (``RunStack.init``:
  the one way a run's state is made, alone or in a stack)."""
  run = config_lib.base_config()
  run.seed = seed
  return RunStack([Run("", run)], mesh).init(
      lambda s: create_train_state_unsharded(model, tx, s, input_shape))


def abstract_state(model: nn.Module, config, input_shape, sharding) -> TrainState:
  """The shapes, dtypes and placement of a run's state (nothing computed): what a checkpoint
  of ``config``'s run is restored into."""
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      jax.eval_shape(lambda: create_train_state_unsharded(model, tx, config.seed, input_shape)))
