"""A byte-level GPT-2-style language model of 8 layers (16 gated branches) trained here on the
Python documentation that ships with CPython (``lm_corpus.python_docs``: offline, PSF License),
then the paper's experiments on it, beside our ResNet-110 (``results/cifar10``).

    python -m resnet_ensemble.lm --config=configs/lm_python_docs.py \
        --workdir=runs/lm_python_docs --mode=all

1.6 M parameters; the time it takes is in BUILD_NOTES ("A transformer trained here").
"""

from resnet_ensemble.lm_config import base_config


def get_config():
  c = base_config()
  c.model.name = "gpt2"
  c.model.n_layers = 8
  c.model.d_model = 128
  c.model.n_heads = 4
  c.model.d_ff = 512
  c.model.vocab_size = 256           # bytes
  c.model.max_positions = 128
  c.data.corpus = "python_docs"
  c.data.window = 128
  c.data.max_windows = 128           # the first 128 held-out windows (16,384 tokens predicted)
  c.train.steps = 2000
  c.train.batch_size = 16
  c.train.learning_rate = 1.5e-3
  c.train.warmup_steps = 100
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.eval.batch_size = 32
  c.lesion.max_k = 8                 # E3: up to half of the 16 branches
  c.lesion.draws = 10
  c.lesion.reorder_max_swaps = 4
  c.lesion.reorder_draws = 10
  c.paths.samples_per_k = 100        # E6: routed paths per length 0..16
  c.report.resnet = "results/cifar10/resnet110_seed0"
  return c
