"""Restoring a trained network for the analyses: from a workdir's newest checkpoint, its exported
variables, or imported pretrained weights; with the data it is evaluated on."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble import (checkpoint, data as data_lib, imagenet, models, pretrained,
                             pretrained_cifar, workdir as workdir_lib)
from resnet_ensemble.layout import BlockLayout
from resnet_ensemble.state import abstract_state
from resnet_ensemble.progress import say
from resnet_ensemble.sharding import make_mesh, put_tree, replicated


@dataclasses.dataclass
class Trained:
  model: nn.Module
  variables: dict            # params + batch_stats, on the host/default device
  step: int                  # checkpoint step the variables come from (0: imported weights)
  dataset: data_lib.ImageDataset  # or, for ImageNet, an imagenet.StreamedValidation
  num_steps: int = 0         # the run's length (0: imported weights, nothing to train)

  @property
  def finished(self) -> bool:
    return self.step >= self.num_steps

  def describe(self) -> dict:
    """What the analyses record of the network they ran on (the report reads it)."""
    return {"checkpoint_step": self.step, "num_steps": self.num_steps,
            "finished": self.finished}

  @property
  def layout(self) -> BlockLayout:
    return self.model.layout


VARIABLES_FILE = "variables.msgpack"


class UnfinishedRunError(RuntimeError):
  """An analysis asked of a run whose training has not reached ``train.num_steps``."""


def load_trained(config, workdir: str, allow_unfinished: bool = False,
                 dataset=None) -> Trained:
  """The newest checkpoint of ``workdir`` for ``config`` (model/data must match), or, in a
  workdir without checkpoints, its exported ``variables.msgpack`` (a published result). With
  ``config.weights`` set, the imported pretrained weights instead (``load_pretrained``).

  A run that has not reached ``config.train.num_steps`` (stopped, preempted, or still
  training) is refused: its numbers would pass for the trained network's. ``allow_unfinished``
  analyses it anyway, and the results say so (``Trained.describe``). ``dataset``: the
  evaluation source (``eval_dataset(config.data)``) when the caller loaded it already."""
  if config.get("weights"):
    return load_pretrained(config, dataset)
  manager = (checkpoint.make_manager(workdir)
             if workdir_lib.path(workdir, "checkpoints").is_dir() else None)
  exported = workdir_lib.path(workdir, VARIABLES_FILE)
  has_checkpoint = manager is not None and bool(manager.all_steps())
  if not has_checkpoint and not exported.exists():
    raise FileNotFoundError(
        f"no trained checkpoint in workdir {workdir} (nor an exported {VARIABLES_FILE}): "
        f"train first with --mode=train (or --mode=all) and the same --workdir")
  workdir_lib.check_analysis(workdir, config,
                             checkpoint.saved_config(manager) if has_checkpoint else None)
  dataset = eval_dataset(config.data) if dataset is None else dataset
  model = models.build(config.model, dataset.num_classes)
  if not has_checkpoint:
    variables, step = read_variables(str(exported), model, dataset.input_shape)
    variables = jax.device_put(variables, replicated(make_mesh()))
    t = Trained(model=model, variables=variables, step=step, dataset=dataset,
                num_steps=config.train.num_steps)
  else:
    abstract = abstract_state(model, config, dataset.input_shape, replicated(make_mesh()))
    state = checkpoint.restore_latest(manager, abstract)
    t = Trained(model=model, variables={"params": state.params, "batch_stats": state.batch_stats},
                step=int(state.step), dataset=dataset, num_steps=config.train.num_steps)
  if not t.finished:
    if not allow_unfinished:
      raise UnfinishedRunError(
          f"the run in {workdir} is unfinished: its newest checkpoint is step {t.step} of "
          f"train.num_steps={t.num_steps}. Resume it with --mode=train (or --mode=all) and the "
          "same command, or analyse it as it is with --allow_unfinished")
    say(f"warning: analysing an unfinished run (step {t.step} of {t.num_steps}, "
        "--allow_unfinished)")
  return t


def eval_dataset(data_config):
  """The data the analyses evaluate on: resident (digits, CIFAR-10) or, for ImageNet, the
  validation split streamed from TFDS (nothing is read until its batches are)."""
  if data_config.name == "imagenet2012":
    return imagenet.StreamedValidation(image_size=data_config.image_size,
                                       data_dir=data_config.dir or None)
  return data_lib.load(data_config)


class Sources:
  """The evaluation source of each data config a job uses (``eval_dataset``), loaded at its
  first use and kept: ``--mode=all`` trains and analyses every run on one load."""

  def __init__(self):
    self._loaded: dict[str, object] = {}

  def __call__(self, data_config):
    key = data_config.to_json(sort_keys=True)
    if key not in self._loaded:
      self._loaded[key] = eval_dataset(data_config)
    return self._loaded[key]


def load_pretrained(config, dataset=None) -> Trained:
  """``config.weights``, a state dict of ``config.arch`` (torchvision's ImageNet ResNets, or the
  PyTorch CIFAR ResNets: resnet20, ..., or ``cifar``, the depth the file holds), as the gated
  Flax model and its variables (step 0: nothing was trained here). ``model.width`` 0 = the
  arch's own. ``dataset``: as ``load_trained``'s."""
  importer = pretrained_cifar if pretrained_cifar.is_cifar_arch(config.arch) else pretrained
  model, variables = importer.load_pretrained(
      config.arch, config.weights, width=config.model.width or None,
      dtype=jnp.dtype(config.model.dtype), unroll=config.model.unroll)
  dataset = eval_dataset(config.data) if dataset is None else dataset
  if model.num_classes != dataset.num_classes:
    raise ValueError(f"{config.weights} has {model.num_classes} classes but data "
                     f"{config.data.name} has {dataset.num_classes}")
  return Trained(model=model, variables=put_tree(variables, replicated(make_mesh())), step=0,
                 dataset=dataset)


def export_variables(config, workdir: str, allow_unfinished: bool = False) -> str:
  """Writes the newest checkpoint's params and BatchNorm statistics (no optimizer state: half
  the size) as ``workdir/variables.msgpack``, the file a published result carries."""
  t = load_trained(config, workdir, allow_unfinished)
  payload = {"step": t.step, "variables": jax.tree.map(np.asarray, t.variables)}
  target = workdir_lib.path(workdir, VARIABLES_FILE)
  if workdir_lib.is_main_process():
    workdir_lib.check_owner(workdir)
    tmp = target.parent / (target.name + ".tmp")
    tmp.write_bytes(serialization.msgpack_serialize(payload))
    tmp.replace(target)
  return str(target)


def read_variables(path: str, model: nn.Module, input_shape) -> tuple[dict, int]:
  """Reads an exported ``variables.msgpack`` and checks it against ``model``'s variables: a
  file from another architecture is an error naming the first mismatching entries."""
  try:
    payload = serialization.msgpack_restore(workdir_lib.path(path).read_bytes())
    variables, step = payload["variables"], int(payload["step"])
  except Exception as e:  # msgpack raises several types for a damaged file
    raise ValueError(f"{path} is not a readable exported variables file "
                     f"({type(e).__name__}: {str(e)[:200]})") from e
  expected = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jax.numpy.zeros((1,) + tuple(input_shape), jax.numpy.float32)))
  want = {jax.tree_util.keystr(k): v.shape for k, v in
          jax.tree_util.tree_flatten_with_path(dict(expected))[0]}
  have = {jax.tree_util.keystr(k): np.shape(v) for k, v in
          jax.tree_util.tree_flatten_with_path(variables)[0]}
  bad = sorted(set(want) ^ set(have)) + sorted(k for k in set(want) & set(have)
                                               if want[k] != have[k])
  if bad:
    raise ValueError(f"{path} does not match the configured model: {len(bad)} entries differ "
                     f"(missing, unexpected or reshaped), e.g. {bad[:5]}")
  return variables, step
