"""The base config every experiment config starts from (configs/*.py override fields).

All fields exist here so that ``lock_config=True`` turns a mistyped ``--config.`` override into
an error instead of a silently ignored new field.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Several seeds trained at once as one vmapped program (resnet_ensemble/stack.py), each run in
  # workdir/seed{s}, the same numbers as trained alone; () = the single run of `seed`.
  c.seeds = ()

  c.model = ml_collections.ConfigDict()
  c.model.name = "cifar_resnet"      # cifar_resnet | imagenet_resnet | plain
  c.model.depth = 110                # CIFAR: 6n+2; ImageNet: 18/34/50/101/152/200
  c.model.width = 0                  # 0: the standard width (16 CIFAR, 64 ImageNet, 128 plain)
  c.model.block_form = "preact"      # preact | postact
  c.model.shortcut = "projection"    # projection | zero_pad (option A)
  c.model.plain_stages = (5, 4, 4)   # plain net: gated layers per stage
  c.model.dtype = "float32"          # compute dtype; params and BN statistics stay float32
  c.model.stream_dtype = ""          # residual nets: the identity path's dtype between blocks
                                     # ("" = dtype; float32 with bf16 compute: exact sums)
  c.model.unroll = 1                 # scan unroll over a stage's blocks; 0 = fully unrolled

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar10"            # digits | cifar10 | imagenet2012
  c.data.source = "auto"             # cifar10: auto | bin | tfds
  c.data.dir = "~/.cache/cifar10"    # holds cifar-10-batches-bin/ (or a TFDS data_dir)
  c.data.crop_padding = 4            # random crop after zero padding by this many pixels
  c.data.flip = True                 # random horizontal flips
  c.data.image_size = 224            # ImageNet only

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.num_steps = 64_000
  c.train.steps_per_call = 1         # steps per compiled call (lax.scan)
  c.train.conv_groups = 1            # the batch as G slices over G weight copies: grouped
                                     # convolutions, same function (train.grouped_apply)
  c.train.log_every = 200
  c.train.eval_every = 4_000
  c.train.progress_every_s = 30.0

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 1e-4
  c.optim.warmup = "constant"        # constant (He et al.) | linear
  c.optim.warmup_steps = 400
  c.optim.warmup_learning_rate = 0.01
  c.optim.schedule = "piecewise"     # piecewise | cosine
  c.optim.boundaries = (32_000, 48_000)
  c.optim.decay_factor = 0.1
  c.optim.label_smoothing = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 1_000
  c.eval.max_images = 0              # analyses: only the first N test images (0 = all)
  c.eval.conv_groups = 1             # as train.conv_groups, for the eval during training

  c.gates = ml_collections.ConfigDict()
  c.gates.sampler = "none"           # none | effective (E8) | stochastic_depth (E10)
  c.gates.k = 23                     # effective: active blocks per mini-batch
  c.gates.keep_downsampling = True   # downsampling blocks always active (count towards k)
  c.gates.p_last = 0.5               # stochastic depth: survival probability of the last block
  c.gates.per_example = False        # stochastic depth: independent gates per example
  c.gates.test_scaling = "expected"  # expected: residuals scaled by E[gate] at test; none
  c.gates.skip_compute = True        # training: a block gated off for the batch is not computed
                                     # (same results either way; speed only)

  c.lesion = ml_collections.ConfigDict()
  c.lesion.max_k = 20                # E3: delete k = 0..max_k random blocks
  c.lesion.draws = 100               # E3: draws per k
  c.lesion.exclude_downsampling_variant = True  # E3 again, never deleting downsampling blocks
  c.lesion.reorder_max_swaps = 30    # E4: k = 1..max random swaps of same-shape blocks
  c.lesion.reorder_draws = 50        # E4: draws per k
  c.lesion.chunk = 32                # damaged networks evaluated per compiled call
  # E1/E3 variants: "shared" weights (one convolution over variants x images), "per_variant"
  # copies (a grouped convolution, as E4's reorders need) or "auto": per_variant on GPUs for
  # nets of <= 64 channels, where grouped convolutions ran faster, shared elsewhere
  # (BUILD_NOTES, "Lesion forms"). The errors are the same.
  c.lesion.variant_weights = "auto"

  c.paths = ml_collections.ConfigDict()
  c.paths.samples_per_k = 1_000      # E6: sampled paths per length k = 0..n
  c.paths.batch_size = 128           # E6: training images per forward (a new batch per chunk)
  c.paths.chunk = 50                 # paths per compiled call (they share one forward)

  c.report = ml_collections.ConfigDict()
  c.report.vgg_workdir = ""          # a trained plain network's workdir (Fig. 3, VGG panel)
  c.report.sd_workdir = ""           # stochastic-depth model's workdir (Fig. 8)
  c.report.effective_workdir = ""    # effective-paths model's workdir (E8 row)
  c.report.seed_workdirs = ""        # more seeds of the main run, comma-separated workdirs
                                     # (test error's mean ± std over seeds)
  c.report.out_dir = ""              # where report.md and the figures go ("" = the workdir)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 4_000
  c.checkpoint.max_to_keep = 3
  return c
