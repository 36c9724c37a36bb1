"""A trained network from a workdir: model, variables and the data it was trained on."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from resnet_ensemble import checkpoint, data as data_lib, models, optim
from resnet_ensemble.layout import BlockLayout


@dataclasses.dataclass
class Trained:
  model: nn.Module
  variables: dict            # params + batch_stats, on the host/default device
  step: int                  # checkpoint step the variables come from
  dataset: data_lib.ImageDataset

  @property
  def layout(self) -> BlockLayout:
    return self.model.layout


def load_trained(config, workdir: str) -> Trained:
  """Restores the newest checkpoint of ``workdir`` for ``config`` (model/data must match)."""
  from resnet_ensemble import results
  manager = (checkpoint.make_manager(workdir)
             if results.path(workdir, "checkpoints").is_dir() else None)
  if manager is None or manager.latest_step() is None:
    raise FileNotFoundError(
        f"no trained checkpoint in workdir {workdir}: train first with "
        f"--mode=train (or --mode=all) and the same --workdir")
  checkpoint.check_config(workdir, config)
  dataset = data_lib.load(config.data)
  model = models.build(config.model, dataset.num_classes)
  from resnet_ensemble import train  # late: train imports this module's users
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  from resnet_ensemble.sharding import make_mesh, replicated
  rep = replicated(make_mesh())
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
      jax.eval_shape(lambda: train.create_train_state_unsharded(
          model, tx, config.seed, dataset.train_images.shape[1:])))
  state = checkpoint.restore_latest(manager, abstract)
  return Trained(model=model, variables={"params": state.params, "batch_stats": state.batch_stats},
                 step=int(state.step), dataset=dataset)


def padded_test_batches(dataset: data_lib.ImageDataset, batch_size: int):
  """The test split as (n_batches, B, ...) uint8 images, int32 labels and a float mask."""
  n = len(dataset.test_labels)
  n_batches = -(-n // batch_size)
  pad = n_batches * batch_size - n
  images = np.concatenate([dataset.test_images,
                           np.zeros((pad,) + dataset.test_images.shape[1:], np.uint8)])
  labels = np.concatenate([dataset.test_labels, np.zeros((pad,), np.int32)])
  mask = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
  shape = (n_batches, batch_size)
  return (images.reshape(shape + images.shape[1:]), labels.reshape(shape), mask.reshape(shape))
