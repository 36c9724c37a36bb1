"""E10: ResNet-110 trained with stochastic depth (Huang et al. 2016): block i survives a
mini-batch with probability 1 - (i+1)/54 * (1 - 0.5); at test time every residual is scaled by
its survival probability. Then ``--mode=lesion`` gives Fig. 8's per-block deletion.

On a GPU add ``--config.gates.skip_compute=False``: the same results (``blocks.should_skip``),
and about 40 of the 54 blocks run per batch, too many for skipping to pay for its conditionals
there (measured on an H100: skipping was slower than computing every block).

    python -m resnet_ensemble --config=configs/cifar10_resnet110_sd.py \
        --workdir=runs/r110_sd --config.data.dir=~/.cache/cifar10
"""

from resnet_ensemble.config import base_config


def get_config():
  c = base_config()
  c.model.name = "cifar_resnet"
  c.model.depth = 110
  c.data.name = "cifar10"
  c.gates.sampler = "stochastic_depth"
  c.gates.p_last = 0.5
  c.gates.keep_downsampling = False  # Huang et al. drop every residual block
  return c
