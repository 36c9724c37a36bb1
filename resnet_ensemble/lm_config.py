"""The base config of the transformer experiments (``python -m resnet_ensemble.lm``); configs
such as configs/lm_bytes.py override its fields. Every field exists here, so a mistyped
``--config.`` override is an error (``lock_config=True``)."""

from __future__ import annotations

import ml_collections

ARCHITECTURES = ("gpt2", "llama")
TOKENIZERS = ("auto", "bytes", "folder")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # A local Hugging Face folder (config.json + weights, GPT-2 or Llama family): the model
  # analysed. Empty: a freshly initialised model of ``model.*`` (seeded; nothing is trained).
  c.weights = ""

  c.model = ml_collections.ConfigDict()   # used only without ``weights``
  c.model.name = "gpt2"                   # gpt2 | llama (the presets of transformer.py)
  c.model.n_layers = 4
  c.model.d_model = 32
  c.model.n_heads = 4
  c.model.d_ff = 128
  c.model.vocab_size = 256                # bytes
  c.model.max_positions = 64              # gpt2: learned positions

  c.data = ml_collections.ConfigDict()
  c.data.text = ""                        # a UTF-8 text file: the held-out text
  c.data.tokenizer = "auto"               # auto (the folder's tokenizer.json with weights,
                                          # else bytes) | bytes | folder
  c.data.window = 64                      # tokens read per window (each predicts the next)
  c.data.max_windows = 0                  # only the first N windows (0 = all)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16                  # windows per batch

  # --mode=eval: one variant given by hand, next to the intact model.
  c.variant = ml_collections.ConfigDict()
  c.variant.order = ()                    # layers run, an index array (() = 0..L-1)
  c.variant.gates = ()                    # one per branch run, 2 x len(order) (() = ones)

  c.lesion = ml_collections.ConfigDict()
  c.lesion.max_k = 6                      # E3: delete k = 0..max_k random branches
  c.lesion.draws = 10                     # E3: draws per k
  c.lesion.keep_ends_variant = True       # E3 again, never deleting the first and last layer
  c.lesion.reorder_max_swaps = 4          # E4: k = 1..max random layer swaps
  c.lesion.reorder_draws = 10             # E4: draws per k
  c.lesion.shuffles = 4                   # E4 painters: random shuffles of the middle span
  c.lesion.chunk = 8                      # variants per compiled call

  c.paths = ml_collections.ConfigDict()
  c.paths.samples_per_k = 20              # E6: sampled paths per length k = 0..2L
  c.paths.batch_size = 8                  # E6: windows per forward (a new batch per chunk)
  c.paths.chunk = 16                      # paths per compiled call (one shared forward)
  return c


def validate(c) -> None:
  """Values no run can use, each a ValueError naming the field (before anything is loaded)."""
  if c.model.name not in ARCHITECTURES:
    raise ValueError(f"--config.model.name={c.model.name!r} is not an architecture; valid: "
                     f"{', '.join(ARCHITECTURES)}")
  if c.data.tokenizer not in TOKENIZERS:
    raise ValueError(f"--config.data.tokenizer={c.data.tokenizer!r}; valid: "
                     f"{', '.join(TOKENIZERS)}")
  if not c.data.text:
    raise ValueError("--config.data.text is empty: name a UTF-8 text file to evaluate on")
  positive = {"data.window": c.data.window, "eval.batch_size": c.eval.batch_size,
              "lesion.chunk": c.lesion.chunk, "paths.samples_per_k": c.paths.samples_per_k,
              "paths.batch_size": c.paths.batch_size, "paths.chunk": c.paths.chunk,
              "model.n_layers": c.model.n_layers, "model.d_model": c.model.d_model,
              "model.n_heads": c.model.n_heads, "model.d_ff": c.model.d_ff,
              "model.vocab_size": c.model.vocab_size,
              "model.max_positions": c.model.max_positions}
  at_least_zero = {"seed": c.seed, "data.max_windows": c.data.max_windows,
                   "lesion.max_k": c.lesion.max_k, "lesion.draws": c.lesion.draws,
                   "lesion.reorder_max_swaps": c.lesion.reorder_max_swaps,
                   "lesion.reorder_draws": c.lesion.reorder_draws,
                   "lesion.shuffles": c.lesion.shuffles}
  for fields, least in ((positive, 1), (at_least_zero, 0)):
    for name, value in fields.items():
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"--config.{name}={value!r}: must be an integer >= {least}")
