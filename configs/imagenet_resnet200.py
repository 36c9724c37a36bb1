"""Pre-activation ResNet-200 on ImageNet (TFDS imagenet2012), for Fig. 4 of the paper.

    python -m resnet_ensemble --config=configs/imagenet_resnet200.py --workdir=runs/r200 \
        --config.data.dir=gs://YOUR_BUCKET/tensorflow_datasets

Batch 256 per 8 accelerators, lr 0.1 x batch/256, /10 at epochs 30, 60, 80 (90 epochs).
"""

from resnet_ensemble.config import base_config

IMAGENET_TRAIN = 1_281_167


def get_config():
  c = base_config()
  c.model.name = "imagenet_resnet"
  c.model.depth = 200
  c.model.dtype = "bfloat16"
  c.model.unroll = 0
  c.data.name = "imagenet2012"
  c.data.dir = ""
  c.data.image_size = 224
  c.train.batch_size = 256
  steps_per_epoch = IMAGENET_TRAIN // c.train.batch_size
  c.train.num_steps = 90 * steps_per_epoch
  c.train.eval_every = 5 * steps_per_epoch
  c.train.log_every = 500
  c.optim.learning_rate = 0.1 * c.train.batch_size / 256
  c.optim.warmup = "linear"
  c.optim.warmup_steps = 5 * steps_per_epoch
  c.optim.warmup_learning_rate = 0.0
  c.optim.boundaries = tuple(e * steps_per_epoch for e in (30, 60, 80))
  c.eval.batch_size = 200
  c.checkpoint.every = steps_per_epoch
  return c
