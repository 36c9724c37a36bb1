"""The analyses on a pretrained torchvision / timm ImageNet ResNet (no training).

    python -m resnet_ensemble --config=configs/imagenet_pretrained.py --config.weights=/path/resnet50.safetensors --config.arch=resnet50 --workdir=W --mode=all

``weights`` is a torchvision-named state dict (``.safetensors``, read with numpy only, or
``.pth``/``.pt``, read with ``torch.load(weights_only=True)`` if torch is installed); ``arch``
is one of resnet18/34/50/101/152, wide_resnet50_2/101_2 (see resnet_ensemble/pretrained.py).
The model is the post-activation ImageNet ResNet of that arch; nothing is trained: E1 (E2, the
paper's Fig. 4), E3, E4 and E6/E7 run on TFDS ``imagenet2012`` validation (resize-256 /
center-crop-224), streamed: every chunk of ``lesion.chunk`` damaged networks is one pass over
it. Every variant costs a pass's worth of forwards (50,000 images), so the draws are fewer than
CIFAR's; ``--config.eval.max_images=5000`` makes a quick run. E6 uses whole validation batches.
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
  c.eval.max_images = 0               # 0: all 50,000 validation images
  c.lesion.max_k = 8                  # resnet18 has 8 blocks; resnet50 16, resnet152 50
  c.lesion.draws = 10
  c.lesion.reorder_max_swaps = 8
  c.lesion.reorder_draws = 10
  c.lesion.chunk = 16                 # x 250 images of activations per compiled call
  c.paths.samples_per_k = 100
  c.paths.batch_size = 64
  c.paths.chunk = 16
  return c
