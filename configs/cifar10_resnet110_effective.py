"""E8: ResNet-110 trained with effective paths only: every mini-batch keeps exactly 23 of the
54 blocks active (downsampling blocks always among them), so path lengths are at most 23.
At test time all blocks are active, residuals scaled by their expected gate (the unscaled
network is evaluated and logged too).

    python -m resnet_ensemble --config=configs/cifar10_resnet110_effective.py \
        --workdir=runs/r110_effective --config.data.dir=~/.cache/cifar10
"""

from resnet_ensemble.config import base_config


def get_config():
  c = base_config()
  c.model.name = "cifar_resnet"
  c.model.depth = 110
  c.data.name = "cifar10"
  c.gates.sampler = "effective"
  c.gates.k = 23
  c.gates.keep_downsampling = True
  return c
