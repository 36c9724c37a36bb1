"""The base config every experiment config starts from (configs/*.py override fields).

All fields exist here so that ``lock_config=True`` turns a mistyped ``--config.`` override into
an error instead of a silently ignored new field.
"""

from __future__ import annotations

import json
import sys

import ml_collections
from etils import epath


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Several runs trained at once as one vmapped program (resnet_ensemble/stack.py), each in its
  # own workdir with the numbers it has trained alone; () = the single run of `seed`.
  c.seeds = ()   # runs that differ only in seed, in workdir/seed{s}
  c.stack = ()   # named runs, each "NAME" or "NAME:KEY=VALUE,...", KEY seed or gates.*
                 # (e.g. "e8:gates.sampler=effective,gates.k=23"), in workdir/NAME

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
  c.model.unroll = -1                # scan unroll over a stage's blocks: k, 0 = fully, -1 = by
                                     # platform (fully on the CPU, rolled on accelerators)

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar10"            # digits | cifar10 | imagenet2012
  c.data.source = "auto"             # cifar10: auto | bin | tfds | exact_subset (the
                                     # test images with exact pixels; a test set only)
  c.data.dir = "~/.cache/cifar10"    # holds cifar-10-batches-bin/ (or a TFDS data_dir; for
                                     # exact_subset the .npz(.xz) or the folder holding it)
  # The input normalisation, per channel in 0..255 units: () = the train split's own mean and
  # std; networks trained elsewhere need theirs (configs/cifar10_pretrained.py).
  c.data.mean = ()
  c.data.std = ()
  c.data.crop_padding = 4            # random crop after zero padding by this many pixels
  c.data.flip = True                 # random horizontal flips
  c.data.image_size = 224            # ImageNet only

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.num_steps = 64_000
  c.train.steps_per_call = 1         # steps per compiled call (lax.scan)
  c.train.conv_groups = 1            # the batch as G slices over G weight copies: grouped
                                     # convolutions, same function (evaluate.grouped_apply)
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
  # copies (a grouped convolution, as E4's reorders need), "prefix" (each variant from the
  # intact network's kept block inputs, from its first change on; resident test images) or
  # "auto": prefix on the CPU, per_variant on GPUs for nets of <= 64 channels, where grouped
  # convolutions ran faster, shared elsewhere. The errors are
  # the same.
  c.lesion.variant_weights = "auto"

  c.paths = ml_collections.ConfigDict()
  c.paths.samples_per_k = 1_000      # E6: sampled paths per length k = 0..n
  c.paths.batch_size = 128           # E6: training images per forward (a new batch per chunk)
  c.paths.chunk = 50                 # paths per compiled call (they share one forward)

  c.paper = ml_collections.ConfigDict()  # --mode=all on a stack: the whole paper (paper.py)
  c.paper.plain = False              # also train and analyse the plain network (Fig. 3)
  c.paper.plain_stages = (5, 4, 4)   # its gated layers per stage (VGG-15)
  c.paper.plain_width = 128          # its width

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


def from_dict(values: dict, source: str | None = None) -> ml_collections.ConfigDict:
  """The base config with ``values`` (a config's JSON dict, lists as tuples) over it. A field
  the base config lacks is a ValueError naming it, or, with ``source`` (a run's config.json),
  a field the code has since removed: skipped with a note, so the run can still be resumed
  and analysed (the guards ignore such fields too, ``removed_fields``)."""
  c = base_config()
  removed = removed_fields(values)
  if removed and source is None:
    raise ValueError(f"{removed[0]} is not a config field (resnet_ensemble/config.py)")
  if removed:
    print(f"note: {source} holds field(s) this code no longer has: {', '.join(removed)} "
          "(ignored)", file=sys.stderr, flush=True)

  def fill(node, tree, prefix):
    for key, value in tree.items():
      if key not in node:
        continue
      if isinstance(value, dict):
        fill(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = tuple(value) if isinstance(value, list) else value

  fill(c, values, "")
  return c


def from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with, read back from ``workdir/config.json``
  (``configs/run.py:WORKDIR``): one run of a stack resumed, analysed or published alone,
  without repeating its seed and gates."""
  source = epath.Path(workdir, "config.json")
  if not source.exists():
    raise ValueError(f"{workdir} holds no config.json: not the workdir of a run")
  try:
    values = json.loads(source.read_text())
  except ValueError as e:
    raise ValueError(f"{source} is not valid JSON ({e})") from e
  return from_dict(values, source=str(source))


# The fields a resumed training may change: how the run executes, logs and is analysed, never
# what it computes. Every other field (seed, model, data, optim, gates, batch size, ...) must
# equal the one the workdir's run was started with (``workdir.guard_resume``). A name stands for
# its whole section ("eval") or one field ("train.log_every").
RESUME_MAY_CHANGE = (
    "seeds", "stack",        # the stack a run trains in: each run's own seed and gates are
                             # guarded
    "train.num_steps",       # extends (or ends) a run; cosine schedules follow the new length
    "train.steps_per_call",  # steps per compiled call: the same steps
    "train.conv_groups",     # grouped convolutions: the same function
    "train.log_every", "train.eval_every", "train.progress_every_s",
    "model.unroll",          # scan unrolling: the same function
    "data.dir", "data.source",  # where the same dataset is read from
    "gates.skip_compute",    # speed only: the same numbers (tests/test_skip.py)
    "eval", "lesion", "paths", "report", "checkpoint",
    "paper",                 # what --mode=all runs beside the run: not what the run computes
)

# The fields an analysis must share with the run it analyses: what the network and its data
# are. Its compute dtype, unrolling and data location may differ (E6 in float32 on a network
# trained in bf16, say).
ANALYSIS_MUST_MATCH = ("model", "data")
ANALYSIS_MAY_CHANGE = ("model.dtype", "model.stream_dtype", "model.unroll", "data.dir",
                       "data.source")


def removed_fields(values, base=None) -> list[str]:
  """The dotted fields of ``values`` (a stored config) that the base config (``base``, default
  the ResNets') no longer has."""
  known = flatten(base if base is not None else base_config())
  sections = {k.rsplit(".", 1)[0] for k in known if "." in k}
  return [k for k in flatten(values) if k not in known and k not in sections]


def flatten(config) -> dict[str, object]:
  """``{"train.batch_size": 128, ...}`` from a ConfigDict (or its JSON dict)."""
  tree = config.to_dict() if hasattr(config, "to_dict") else config
  out: dict[str, object] = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value

  walk(tree, "")
  return out


def override(config, field: str, value) -> None:
  """Sets ``config``'s dotted ``field`` ("gates.k") to ``value``, as ``--config.gates.k`` does."""
  *path, leaf = field.split(".")
  node = config
  for name in path:
    node = node[name]
  node[leaf] = value


def covered(field: str, names) -> bool:
  """Is ``field`` one of ``names`` or inside a section named there?"""
  return any(field == n or field.startswith(n + ".") for n in names)


def validate(config) -> None:
  """Refuses values no run can use, before anything is loaded or written (each a ValueError
  that names the field). Model, gates and data are checked where they are built."""
  positive = ["train.batch_size", "train.num_steps", "train.steps_per_call",
              "train.conv_groups", "eval.batch_size", "eval.conv_groups",
              "checkpoint.max_to_keep", "lesion.chunk", "paths.samples_per_k",
              "paths.batch_size", "paths.chunk", "paper.plain_width"]
  at_least_zero = ["seed", "train.log_every", "train.eval_every", "checkpoint.every",
                   "eval.max_images", "lesion.max_k", "lesion.draws",
                   "lesion.reorder_max_swaps", "lesion.reorder_draws", "data.crop_padding",
                   "model.width"]
  values = flatten(config)
  for field in positive + at_least_zero:
    if field not in values:
      continue
    value, least = values[field], 1 if field in positive else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ValueError(f"--config.{field}={value!r}: must be an integer >= {least}")
  for field in ("model.plain_stages", "paper.plain_stages"):  # layers per stage
    sizes = tuple(values.get(field, (1,)))
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
      raise ValueError(f"--config.{field}={sizes!r}: layers per stage, integers >= 1")
  for s in values.get("seeds", []):
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
      raise ValueError(f"--config.seeds={tuple(values['seeds'])!r}: seeds are integers >= 0")


# Configs already checked in this process (their JSON): --mode=all's steps each start from a
# check, and the job pays for one.
_checked: dict[str, object] = {}


def check_config(config):
  """Every check of a training config that needs no data and writes nothing (fields, the runs
  of a stack, model, each run's gates), so a mistake costs seconds, not a data load; returns
  the model. Once per process and config: a second call returns the first one's model."""
  key = config.to_json(sort_keys=True)
  if key not in _checked:
    _checked[key] = _check(config)
  return _checked[key]


def _check(config):
  # Imported here: configs/*.py import this module while the flags are parsed, before jax
  # may be imported (it reads XLA_FLAGS then).
  from resnet_ensemble import data, gates, models
  from resnet_ensemble.stack import runs_of
  validate(config)
  runs = runs_of(config)
  model = models.build(config.model, data.num_classes(config.data.name))
  for run in runs:
    try:
      gates.make_sampler(run.config.gates, model.layout, config.train.batch_size)
    except ValueError as e:
      raise ValueError(f"run {run.name}: {e}" if run.name else str(e)) from None
  return model


def check_devices(config) -> None:
  """The batches split evenly over the devices (training's and its evaluation's), checked
  before the workdir is written; once per process and batch sizes, as ``check_config``."""
  from resnet_ensemble.sharding import check_divisible, make_mesh
  key = f"devices: train {config.train.batch_size}, eval {config.eval.batch_size}"
  if key not in _checked:
    mesh = make_mesh()
    check_divisible(config.train.batch_size, mesh, "train.batch_size")
    check_divisible(config.eval.batch_size, mesh, "eval.batch_size")
    _checked[key] = None
