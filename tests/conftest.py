"""Shared fixtures: tiny configs that train in seconds on a 2-core CPU."""

import os
import sys

import pytest

# Tests are compile-bound (tiny models, few steps): XLA's CPU backend at optimisation level 0
# compiles them ~4x faster. Tests that run for long (the quickstart) unset it in their
# subprocess. Must be set before jax is imported.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", FAST_COMPILE)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def tiny_config(**overrides):
  """ResNet-8 (3 blocks) of width 4 on the embedded digits, float32, a few steps."""
  from resnet_ensemble.config import base_config, override
  c = base_config()
  c.model.depth = 8
  c.model.width = 4
  c.data.name = "digits"
  c.data.crop_padding = 1
  c.data.flip = True
  c.train.batch_size = 32
  c.train.num_steps = 6
  c.train.log_every = 2
  c.train.eval_every = 3
  c.train.progress_every_s = 0.0
  c.optim.warmup_steps = 2
  c.optim.boundaries = (4,)
  c.eval.batch_size = 120
  c.checkpoint.every = 3
  for key, value in overrides.items():
    override(c, key, value)
  return c


@pytest.fixture
def tiny():
  return tiny_config
