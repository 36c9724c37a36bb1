"""The plain "VGG-15" comparison network on CIFAR-10 (stem + 13 gated 128-wide conv layers +
dense), trained with the ResNet-110 recipe.

    python -m resnet_ensemble --config=configs/cifar10_vgg15.py --workdir=runs/vgg15 \
        --config.data.dir=~/.cache/cifar10
"""

from resnet_ensemble.config import base_config


def get_config():
  c = base_config()
  c.model.name = "plain"
  c.model.plain_stages = (5, 4, 4)
  c.data.name = "cifar10"
  # A plain 15-layer network does not need the 110-layer warm-up.
  c.optim.warmup_steps = 0
  return c
