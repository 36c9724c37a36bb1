"""Quickstart: a ResNet-20 on scikit-learn's digits (real 8x8 images shipped inside the
package), on a CPU, offline, in a few minutes: training, then every analysis and the report.

    python -m resnet_ensemble --config=configs/quickstart.py --workdir=runs/quickstart --mode=all
"""

from resnet_ensemble.config import base_config


def get_config():
  c = base_config()
  c.model.name = "cifar_resnet"
  c.model.depth = 20
  c.model.width = 8
  c.data.name = "digits"
  c.data.crop_padding = 1
  c.data.flip = False  # digits are not mirror-symmetric
  c.train.batch_size = 64
  c.train.num_steps = 600
  c.train.steps_per_call = 10
  c.train.log_every = 100
  c.train.eval_every = 300
  c.train.progress_every_s = 5.0
  c.optim.warmup_steps = 0
  c.optim.boundaries = (400, 500)
  c.eval.batch_size = 120
  c.checkpoint.every = 300
  c.lesion.max_k = 9                 # all 9 blocks of ResNet-20
  c.lesion.draws = 20
  c.lesion.reorder_max_swaps = 10
  c.lesion.reorder_draws = 10
  c.paths.samples_per_k = 20
  c.paths.batch_size = 64
  c.paths.chunk = 35
  return c
