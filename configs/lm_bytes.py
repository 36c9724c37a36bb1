"""The transformer experiments on a held-out text, byte tokens: a tiny GPT-2-style model (4
layers, 8 branches), freshly initialised unless --config.weights names a Hugging Face folder.

    python -m resnet_ensemble.lm --config=configs/lm_bytes.py --config.data.text=TEXT.txt \
        --workdir=runs/lm_bytes --mode=all
    # an imported model (its own tokenizer.json):
    python -m resnet_ensemble.lm --config=configs/lm_bytes.py --config.weights=models/gpt2 \
        --config.data.text=TEXT.txt --config.data.window=256 --workdir=runs/gpt2 --mode=all
"""

from resnet_ensemble.lm_config import base_config


def get_config():
  c = base_config()
  c.model.name = "gpt2"
  c.model.n_layers = 4
  c.model.d_model = 32
  c.model.n_heads = 4
  c.model.d_ff = 128
  c.model.vocab_size = 256
  c.model.max_positions = 64
  c.data.window = 64
  c.data.max_windows = 64
  c.lesion.max_k = 8                 # all 8 branches
  c.lesion.draws = 10
  c.lesion.reorder_max_swaps = 4
  c.lesion.reorder_draws = 10
  c.paths.samples_per_k = 20
  return c
