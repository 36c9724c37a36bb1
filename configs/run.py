"""A run's own config, read back from its workdir's config.json: one run of a stack (or any run)
resumed, analysed or published alone, with its seed and gates as it was trained.

    python -m resnet_ensemble --config=configs/run.py:runs/r110_mixed/e8 \
        --workdir=runs/r110_mixed/e8 --mode=lesion --config.data.dir=~/.cache/cifar10
"""

from resnet_ensemble.config import from_workdir


def get_config(workdir: str):
  return from_workdir(workdir)
