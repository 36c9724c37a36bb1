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
  c.model.unroll = -1                     # layer scan unroll: -1 by platform (models.scan_unroll)

  c.data = ml_collections.ConfigDict()
  c.data.corpus = ""                      # a built-in corpus (lm_corpus: python_docs), its
                                          # training and held-out halves; "" reads the files:
  c.data.text = ""                        # a UTF-8 text file: the held-out text
  c.data.train_text = ""                  # a UTF-8 text file: the training text (train.steps)
  c.data.tokenizer = "auto"               # auto (the folder's tokenizer.json with weights,
                                          # else bytes) | bytes | folder
  c.data.window = 64                      # tokens read per window (each predicts the next)
  c.data.max_windows = 0                  # only the first N windows (0 = all)

  # Training a fresh ``model.*`` here (``--mode=train``; ``all`` trains first): bytes as tokens.
  c.train = ml_collections.ConfigDict()
  c.train.steps = 0                       # 0: nothing trained (a fresh or imported model)
  c.train.batch_size = 16                 # windows of data.window + 1 tokens per step
  c.train.learning_rate = 1e-3            # AdamW's peak, after a linear warm-up
  c.train.warmup_steps = 100
  c.train.final_learning_rate_ratio = 0.1  # cosine decay to this share of the peak
  c.train.weight_decay = 0.1              # decoupled, on the matrices only
  c.train.beta2 = 0.99
  c.train.grad_clip = 1.0                 # global norm
  c.train.log_every = 50
  c.train.eval_every = 250                # held-out loss (the analyses' windows)
  c.train.checkpoint_every = 250
  c.train.progress_every_s = 30.0

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

  c.report = ml_collections.ConfigDict()
  c.report.resnet = ""                    # a ResNet workdir (lesion.json, gradients.json) set
                                          # beside the transformer in the report
  return c


def validate(c) -> None:
  """Values no run can use, each a ValueError naming the field (before anything is loaded)."""
  if c.model.name not in ARCHITECTURES:
    raise ValueError(f"--config.model.name={c.model.name!r} is not an architecture; valid: "
                     f"{', '.join(ARCHITECTURES)}")
  if c.data.tokenizer not in TOKENIZERS:
    raise ValueError(f"--config.data.tokenizer={c.data.tokenizer!r}; valid: "
                     f"{', '.join(TOKENIZERS)}")
  if c.data.corpus:
    from resnet_ensemble import lm_corpus
    if c.data.corpus not in lm_corpus.CORPORA:
      lm_corpus.load(c.data.corpus)  # the one-line error naming the corpora
    for field in ("text", "train_text"):
      if c.data[field]:
        raise ValueError(f"--config.data.corpus={c.data.corpus} gives both texts; "
                         f"--config.data.{field} must be empty")
  elif not c.data.text:
    raise ValueError("--config.data.text is empty: name a UTF-8 text file to evaluate on "
                     "(or a built-in --config.data.corpus)")
  if c.train.steps:
    if c.weights:
      raise ValueError("--config.train.steps trains a fresh model of --config.model; "
                       f"--config.weights={c.weights} imports one: set one of them")
    if not (c.data.corpus or c.data.train_text):
      raise ValueError("--config.train.steps needs a training text: --config.data.train_text "
                       "or --config.data.corpus")
  positive = {"data.window": c.data.window, "eval.batch_size": c.eval.batch_size,
              "lesion.chunk": c.lesion.chunk, "paths.samples_per_k": c.paths.samples_per_k,
              "paths.batch_size": c.paths.batch_size, "paths.chunk": c.paths.chunk,
              "model.n_layers": c.model.n_layers, "model.d_model": c.model.d_model,
              "model.n_heads": c.model.n_heads, "model.d_ff": c.model.d_ff,
              "model.vocab_size": c.model.vocab_size,
              "model.max_positions": c.model.max_positions,
              "train.batch_size": c.train.batch_size, "train.log_every": c.train.log_every,
              "train.eval_every": c.train.eval_every,
              "train.checkpoint_every": c.train.checkpoint_every}
  at_least_zero = {"seed": c.seed, "data.max_windows": c.data.max_windows,
                   "lesion.max_k": c.lesion.max_k, "lesion.draws": c.lesion.draws,
                   "lesion.reorder_max_swaps": c.lesion.reorder_max_swaps,
                   "lesion.reorder_draws": c.lesion.reorder_draws,
                   "lesion.shuffles": c.lesion.shuffles, "train.steps": c.train.steps,
                   "train.warmup_steps": c.train.warmup_steps}
  for fields, least in ((positive, 1), (at_least_zero, 0)):
    for name, value in fields.items():
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"--config.{name}={value!r}: must be an integer >= {least}")
