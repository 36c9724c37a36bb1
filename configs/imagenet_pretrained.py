"""The analyses on a pretrained torchvision / timm ImageNet ResNet (no training).

    python -m resnet_ensemble --config=configs/imagenet_pretrained.py --config.weights=/path/resnet50.safetensors --config.arch=resnet50 --workdir=W --mode=all

``weights`` is a torchvision-named state dict (``.safetensors``, read with numpy only, or
``.pth``/``.pt``, read with ``torch.load(weights_only=True)`` if torch is installed); ``arch``
is one of resnet18/34/50/101/152 (see resnet_ensemble/pretrained.py). The model is the
post-activation ImageNet ResNet of that arch; E1-E7 run on TFDS ``imagenet2012`` validation
(resize-256 / center-crop-224).
"""

from resnet_ensemble.config import base_config


def get_config():
  c = base_config()
  c.weights = ""                      # path of the state dict (.safetensors / .pth / .pt)
  c.arch = "resnet50"                 # torchvision arch: resnet18 | 34 | 50 | 101 | 152
  c.model.name = "imagenet_resnet"
  c.model.depth = 50                  # informational: the arch decides the network
  c.model.block_form = "postact"
  c.model.shortcut = "projection"
  c.data.name = "imagenet2012"
  c.data.dir = ""
  c.data.image_size = 224
  c.eval.batch_size = 250
  return c
