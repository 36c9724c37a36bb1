"""ResNet-110 on CIFAR-10, the paper's recipe (He et al.): batch 128, SGD momentum 0.9,
weight decay 1e-4, lr 0.1 after a 400-step 0.01 warm-up, /10 at 32k and 48k, 64k steps.

    python -m resnet_ensemble --config=configs/cifar10_resnet110.py --workdir=runs/r110 \
        --config.data.dir=~/.cache/cifar10

On a GPU add ``--config.model.dtype=bfloat16 --config.model.unroll=0``.
"""

from resnet_ensemble.config import base_config


def get_config():
  c = base_config()
  c.model.name = "cifar_resnet"
  c.model.depth = 110
  c.data.name = "cifar10"
  return c
