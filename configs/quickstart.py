"""Quickstart: the whole paper in miniature on scikit-learn's digits (real 8x8 images shipped
inside the package), on a CPU, offline, in a few minutes. One program trains five ResNet-20s
(width 8): three seeds of the full network, E8's effective paths (4 of 9 blocks per batch, the
paper's 23/54) and E10's stochastic depth (p_L = 0.5); then the plain network of Fig. 3; then
E1-E4 on each seed, E5-E7 and E9 on seed 0, E1 on the stochastic-depth and plain networks, and
the report with every experiment (paper.py).

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
  c.stack = ("seed0:seed=0", "seed1:seed=1", "seed2:seed=2",
             "e8:gates.sampler=effective,gates.k=4",
             "sd:gates.sampler=stochastic_depth,gates.p_last=0.5,gates.keep_downsampling=false")
  c.paper.plain = True
  c.paper.plain_stages = (3, 3, 3)
  c.paper.plain_width = 16
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
