"""The analyses on a published PyTorch CIFAR ResNet (He et al.'s original form; no training).

    python -m resnet_ensemble --config=configs/cifar10_pretrained.py \
        --config.weights=$RESNET_ENSEMBLE_DATA/pretrained/cifar10/resnet56-4bfd9763.th \
        --workdir=runs/pretrained_r56 --mode=all

``weights`` is the ``.th`` checkpoint as published (read with ``torch.load(weights_only=True)``),
or a ``.pth``/``.pt``/``.safetensors`` of the same state dict; ``arch`` (``cifar``: the depth
the file holds; or resnet20/32/44/56/110/1202, checked against the file) picks the network: the
gated post-activation option-A ResNet (see resnet_ensemble/pretrained_cifar.py). Inputs are
normalised as those networks were trained: ImageNet's mean/std, not CIFAR-10's.

Data: the exact-pixel test subset (1,017 original test images) by default, read from
``data.dir`` (the .npz.xz or its folder; default ``$RESNET_ENSEMBLE_DATA/cifar10``, the
variable expanded when the file is read: README "Data"). ``--config.data.source=bin --config.data.dir=DIR``
evaluates on the official binary release in DIR (or the JPEG copy converted to that layout);
then E6's gradient batches come from its train split.

The draws are sized for a 2-core CPU (ResNet-56 on the subset in well under half an hour); on a
GPU use the paper's: ``--config.lesion.draws=100 --config.lesion.reorder_draws=50
--config.lesion.reorder_max_swaps=30 --config.paths.samples_per_k=1000
--config.paths.batch_size=128``.
"""

from resnet_ensemble.config import base_config
from resnet_ensemble.data import DATA_DIR
from resnet_ensemble.pretrained_cifar import INPUT_MEAN, INPUT_STD


def get_config():
  c = base_config()
  c.weights = ""                      # the .th / .pth / .pt / .safetensors state dict
  c.arch = "cifar"                    # cifar (depth from the file) | resnet20 | ... | resnet1202
  c.model.name = "cifar_resnet"
  c.model.depth = 56                  # informational: the weights decide the network
  c.model.block_form = "postact"
  c.model.shortcut = "zero_pad"
  c.data.name = "cifar10"
  c.data.source = "exact_subset"
  c.data.dir = DATA_DIR + "/cifar10"  # $RESNET_ENSEMBLE_DATA/cifar10, expanded when read
  c.data.mean = INPUT_MEAN
  c.data.std = INPUT_STD
  c.eval.batch_size = 500
  c.lesion.max_k = 20
  c.lesion.draws = 3
  c.lesion.reorder_max_swaps = 10
  c.lesion.reorder_draws = 2
  c.lesion.chunk = 8
  c.paths.samples_per_k = 5
  c.paths.batch_size = 32
  c.paths.chunk = 16
  return c
