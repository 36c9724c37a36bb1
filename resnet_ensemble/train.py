"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

One jitted program per job, over a data-parallel mesh: the state is replicated, every batch is
sharded on the 'data' axis. Small datasets (CIFAR-10, the embedded digits) live on the device
as uint8 and each step selects and augments its own batch, optionally several steps per
compiled call (``train.steps_per_call``, a ``lax.scan``); ImageNet streams from a host pipeline.
"""

import functools
import math
import signal
import threading
import time
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics

from resnet_ensemble import (checkpoint, config as config_lib, data as data_lib,
                             gates as gates_lib, models, optim, results, workdir as workdir_lib,
                             writers)
from resnet_ensemble.augment import batch_indices, normalize, random_crop_flip
from resnet_ensemble.progress import Progress, say
from resnet_ensemble.stack import Run, RunStack, runs_of
from resnet_ensemble.trained import padded_test_batches
from resnet_ensemble.sharding import check_divisible, make_mesh, put, replicated, sharded


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  accuracy: metrics.Accuracy


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy against (optionally label-smoothed) one-hot targets."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return optax.softmax_cross_entropy(logits, targets)


@flax.struct.dataclass
class ResidentData:
  """A dataset on the device: train split flat, test split padded into masked batches."""
  train_images: jax.Array  # uint8 (N, H, W, C), replicated
  train_labels: jax.Array  # int32 (N,)
  test_images: jax.Array   # uint8 (n_batches, B, H, W, C), batch axis sharded
  test_labels: jax.Array   # int32 (n_batches, B)
  test_mask: jax.Array     # float32 (n_batches, B): 0 for padding


def put_resident(dataset: data_lib.ImageDataset, eval_batch_size: int, mesh) -> ResidentData:
  check_divisible(eval_batch_size, mesh, "eval.batch_size")
  test_images, test_labels, mask = padded_test_batches(dataset, eval_batch_size)
  rep, batch_axis = replicated(mesh), sharded(mesh, axis=1)
  return ResidentData(
      train_images=put(dataset.train_images, rep),
      train_labels=put(dataset.train_labels.astype(np.int32), rep),
      test_images=put(test_images, batch_axis),
      test_labels=put(test_labels, batch_axis),
      test_mask=put(mask, batch_axis))


def make_eval_fn(model: nn.Module, mean, std, conv_groups: int = 1) -> Callable:
  """``eval_fn(variables, images, labels, mask, gates=None) -> {loss, accuracy, error, count}``
  over a stack of padded batches (leading axis). Pure, so it can be vmapped over gates.
  ``conv_groups`` (``eval.conv_groups``): each batch as that many slices over weight copies,
  grouped convolutions, the same numbers (``grouped_apply``)."""
  apply = grouped_apply(model, conv_groups, train=False)

  def eval_fn(variables, images, labels, mask, gates=None):
    def body(totals, batch):
      x, y, m = batch
      logits, _ = apply(variables, normalize(x, mean, std), gates, False)
      loss = cross_entropy(logits, y)
      correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
      return (totals[0] + jnp.sum(loss * m), totals[1] + jnp.sum(correct * m)), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (images, labels, mask))
    count = jnp.sum(mask)
    accuracy = correct / count
    return {"loss": loss_sum / count, "accuracy": accuracy, "error": 1.0 - accuracy,
            "count": count}

  return eval_fn


GROUP_AXIS = "conv_groups"


def grouped_apply(model: nn.Module, groups: int, train: bool) -> Callable:
  """``apply(variables, x, gates, skip_compute) -> (logits, batch_stats updates)`` (no
  updates outside training); the batch run as ``groups`` slices over ``groups`` copies of
  the weights.

  vmap over the copies turns every convolution into one grouped convolution with
  ``groups`` x the channels: the same arithmetic in another kernel, which keeps a 16-channel
  layer's GEMM tiles fuller (``train.conv_groups``, ``eval.conv_groups``). In training,
  BatchNorm statistics are taken over the whole batch (a mean over the slices' axis) and the
  copies' gradients sum to the weights' gradient: the function is that of ``groups=1``.
  Slice g holds examples g, g + G, ..., so a batch split over devices stays split the same
  way."""
  mutable = ["batch_stats"] if train else []
  if groups == 1:
    return lambda variables, x, gates, skip: model.apply(
        variables, x, gates=gates, train=train, skip_compute=skip, mutable=mutable)
  grouped = model.clone(norm_axis_name=GROUP_AXIS)

  def split(a: jax.Array, axis: int = 0) -> jax.Array:  # (.., B, ..) -> (G, .., B/G, ..)
    shape = a.shape[:axis] + (a.shape[axis] // groups, groups) + a.shape[axis + 1:]
    return jnp.moveaxis(a.reshape(shape), axis + 1, 0)

  def apply(variables, x, gates, skip):
    if x.shape[0] % groups:
      raise ValueError(f"{'train' if train else 'eval'}.conv_groups={groups} must divide the "
                       f"batch size {x.shape[0]}")
    copies = jax.tree.map(lambda v: jnp.broadcast_to(v, (groups,) + v.shape), variables)
    per_example = gates is not None and gates.ndim == 2  # (n_blocks, batch)
    # Per-example gates differ between slices: each slice's cond would be a select over both
    # branches (nothing saved) that judges a block by its own slice, not by the batch. The
    # multiply form computes the same and judges by the batch (models.BatchNorm's ``live``).
    skip = skip and not per_example
    one = lambda v, xs, g: grouped.apply(  # noqa: E731
        v, xs, gates=g, train=train, skip_compute=skip, mutable=mutable)
    logits, updates = jax.vmap(one, in_axes=(0, 0, 0 if per_example else None),
                               axis_name=GROUP_AXIS)(
        copies, split(x), split(gates, 1) if per_example else gates)
    # (G, B/G, classes) -> (B, classes) in the batch's order; every copy's statistics agree
    logits = jnp.moveaxis(logits, 0, 1).reshape(x.shape[0], -1)
    return logits, jax.tree.map(lambda u: u[0], updates)

  return apply


def make_train_on_batch(model: nn.Module, tx: optax.GradientTransformation, mean, std,
                        label_smoothing: float, mesh,
                        sample_gates: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                        skip_compute: bool = False, conv_groups: int = 1) -> Callable:
  """``train_on_batch(state, images, labels, gate_key=None, run=0)``: one SGD step on a given
  uint8 batch (already augmented).

  With ``sample_gates`` (gates.make_stack_sampler), step t of run ``run`` (its index in a
  stack) trains the network gated by ``sample_gates(fold_in(gate_key, t), run)`` (``gate_key``:
  ``run_keys(seed).gates``): the gate sequence is a function of (seed, step), so a resumed run
  samples the same gates.
  ``skip_compute`` (``gates.skip_compute``): a block gated off for the whole batch is not
  computed (the same loss, gradients and BN statistics: a speed choice). ``conv_groups``: see
  ``grouped_apply``."""
  skip_compute = skip_compute and sample_gates is not None
  apply = grouped_apply(model, conv_groups, train=True)

  def train_on_batch(state: TrainState, images, labels, gate_key: jax.Array | None = None,
                     run: jax.Array | int = 0):
    x = jax.lax.with_sharding_constraint(normalize(images, mean, std), sharded(mesh))
    gates = None
    if sample_gates is not None:
      if gate_key is None:
        raise ValueError("a gate sampler needs the run's gate key (run_keys(seed).gates)")
      gates = sample_gates(jax.random.fold_in(gate_key, state.step), run)

    def loss_fn(params):
      logits, updates = apply({"params": params, "batch_stats": state.batch_stats}, x, gates,
                              skip_compute)
      return cross_entropy(logits, labels, label_smoothing).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    step_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, step_updates),
                          batch_stats=updates["batch_stats"], opt_state=opt_state)
    return state, TrainMetrics.single_from_model_output(loss=loss, logits=logits, labels=labels)

  return train_on_batch


class RunKeys(NamedTuple):
  """The random streams of a run, all from its seed: batch order, augmentation, gates."""
  order: jax.Array
  augment: jax.Array
  gates: jax.Array


def run_keys(seed) -> RunKeys:
  """``seed``: an int or a traced uint32 (a stack of runs passes each run's own)."""
  root = jax.random.key(seed)
  return RunKeys(*(jax.random.fold_in(root, i) for i in (1, 2, 3)))


def make_resident_train_fn(train_on_batch: Callable, *, batch_size: int, crop_padding: int,
                           flip: bool, num_steps: int) -> Callable:
  """``fn(state, data, seed, run) -> (state, metrics)`` running ``num_steps`` steps on resident
  data (``run``: the run's index in its stack, which picks its gate sampler).

  The batch, augmentation and gates of step t depend only on (seed, t). The seed and the run
  are arguments, not constants, so the function can be vmapped over a stack of runs."""

  def train_fn(state: TrainState, data: ResidentData, seed, run):
    keys = run_keys(seed)

    def one_step(state: TrainState):
      idx = batch_indices(keys.order, state.step, data.train_labels.shape[0], batch_size)
      images = random_crop_flip(jax.random.fold_in(keys.augment, state.step),
                                data.train_images[idx], crop_padding, flip)
      return train_on_batch(state, images, data.train_labels[idx], keys.gates, run)

    if num_steps == 1:
      return one_step(state)
    state, stacked = jax.lax.scan(lambda s, _: one_step(s), state, None, length=num_steps)
    return state, stacked.reduce()

  return train_fn


def create_train_state_unsharded(model: nn.Module, tx, seed: int | jax.Array,
                                 input_shape) -> TrainState:
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  variables = model.init(jax.random.fold_in(jax.random.key(seed), 0), x)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def create_train_state(model: nn.Module, tx, seed: int, input_shape, mesh) -> TrainState:
  """The initial state replicated over ``mesh``, initialised on the host (``RunStack.init``:
  the one way a run's state is made, alone or in a stack)."""
  run = config_lib.base_config()
  run.seed = seed
  return RunStack([Run("", run)], mesh).init(
      lambda s: create_train_state_unsharded(model, tx, s, input_shape))


class StopRequest:
  """Turns SIGTERM (a preempted VM) and SIGINT into a request to checkpoint and exit cleanly."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: signal.Signals | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Stopped(Exception):
  """Training stopped by a signal, its state saved: an unfinished run, never a result.

  ``exit_code`` is the shell's for a process killed by that signal (143 for SIGTERM, 130 for
  SIGINT), so a scheduler tells a preempted run from a finished one."""

  def __init__(self, signal_: signal.Signals, step: int, num_steps: int, workdirs: list[str]):
    self.signal, self.step, self.exit_code = signal_, step, 128 + int(signal_)
    super().__init__(
        f"{signal_.name}: saved a checkpoint at step {step} of {num_steps} in "
        f"{', '.join(workdirs)}; rerun the same command to resume")


def _crossed(step: int, previous: int, every: int) -> bool:
  return every > 0 and step // every != previous // every


def _all_finite(tree) -> jax.Array:
  """One device-side reduction: is every floating-point entry of ``tree`` finite?"""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _diverged(what: str, step: int, manager) -> FloatingPointError:
  last = manager.latest_step()
  where = (f"The last finite checkpoint is step {last} (every checkpoint is checked finite "
           "before it is saved)" if last is not None else "No checkpoint was saved")
  return FloatingPointError(f"non-finite {what} at step {step}; stopping. {where}: lower the "
                            "learning rate or check the data.")


class ResidentFeed:
  """A small dataset on the device; each compiled call runs k steps that pick their batches."""

  def __init__(self, config, mesh):
    self.dataset = data_lib.load(config.data)
    d = self.dataset
    say(f"data: {d.source} ({len(d.train_labels)} train, {len(d.test_labels)} test)")
    self.config, self.mesh = config, mesh
    self.num_classes, self.input_shape = d.num_classes, d.train_images.shape[1:]
    self.mean, self.std = d.mean, d.std

  def start(self, model, train_on_batch, log_compile: Callable[[str, float], None],
            stack: RunStack) -> None:
    c, rep = self.config, replicated(self.mesh)
    self.resident = put_resident(self.dataset, c.eval.batch_size, self.mesh)
    self._make = functools.partial(
        make_resident_train_fn, train_on_batch, batch_size=c.train.batch_size,
        crop_padding=c.data.crop_padding, flip=c.data.flip)
    self._compiled: dict[int, Any] = {}
    self._log_compile, self._stack = log_compile, stack
    eval_fn = make_eval_fn(model, self.mean, self.std, c.eval.conv_groups)
    self._eval = jax.jit(stack.vmap(eval_fn, (0, None, None, None, 0)), out_shardings=rep)

  def train(self, state: TrainState, k: int):
    args = (self._stack.seed_arg, self._stack.index_arg)
    if k not in self._compiled:
      t0 = time.perf_counter()
      fn = self._stack.vmap(self._make(num_steps=k), (0, None, 0, 0))
      jitted = jax.jit(fn, out_shardings=(replicated(self.mesh),) * 2, donate_argnums=0)
      self._compiled[k] = jitted.lower(state, self.resident, *args).compile()
      self._log_compile(f"train_{k}_steps", time.perf_counter() - t0)
    return self._compiled[k](state, self.resident, *args)

  def evaluate(self, state: TrainState, gates=None) -> dict:
    """``{eval_loss, eval_accuracy, eval_error}``: scalars, or one value per run of a stack
    (``gates``: None, or each run's, stacked)."""
    r = self.resident
    out = self._eval(state.variables, r.test_images, r.test_labels, r.test_mask, gates)
    return {f"eval_{k}": v for k, v in out.items() if k != "count"}


class StreamedFeed:
  """ImageNet from the host pipeline: each process feeds its share of every global batch."""

  def __init__(self, config, mesh):
    from resnet_ensemble import imagenet
    self.imagenet, self.config, self.mesh = imagenet, config, mesh
    size = config.data.image_size
    self.num_classes, self.input_shape = imagenet.NUM_CLASSES, (size, size, 3)
    self.mean, self.std = imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD
    say(f"data: TFDS imagenet2012 (data_dir={config.data.dir or 'default'})")

  def _split(self, split: str, train: bool, batch_size: int):
    c = self.config.data
    return self.imagenet.make_split(split, batch_size=batch_size, train=train,
                                    image_size=c.image_size, data_dir=c.dir or None,
                                    seed=self.config.seed)

  def _global(self, local: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(sharded(self.mesh), local)

  def start(self, model, train_on_batch, log_compile, stack: RunStack) -> None:
    if stack.stacked:  # one host pipeline feeds one run: stacked runs would share its batches
      raise ValueError(f"a stack of runs ({', '.join(stack.names)}) trains on resident data only "
                       "(cifar10, digits); train ImageNet runs one at a time")
    self.config = stack.runs[0].config  # the run's own seed: its batches and gates
    rep = replicated(self.mesh)
    check_divisible(self.config.eval.batch_size, self.mesh, "eval.batch_size")
    self._batches = self._split("train", True, self.config.train.batch_size)
    gate_key = run_keys(self.config.seed).gates
    self._step = jax.jit(lambda state, x, y: train_on_batch(state, x, y, gate_key),
                         out_shardings=(rep, rep), donate_argnums=0)
    eval_fn = make_eval_fn(model, self.mean, self.std, self.config.eval.conv_groups)
    # One batch at a time: add a leading batch-stack axis of 1 for eval_fn's scan.
    self._eval = jax.jit(lambda v, x, y, m, g: eval_fn(v, x[None], y[None], m[None], g),
                         out_shardings=rep)

  def train(self, state: TrainState, k: int):
    total = None
    for _ in range(k):
      images, labels = next(self._batches)
      state, m = self._step(state, self._global(images), self._global(labels))
      total = m if total is None else total.merge(m)
    return state, total

  def evaluate(self, state: TrainState, gates=None) -> dict:
    loss = correct = count = 0.0
    for images, labels, mask in self._split("validation", False, self.config.eval.batch_size):
      out = self._eval(state.variables, *(self._global(a) for a in (images, labels, mask)), gates)
      n = float(out["count"])
      loss, correct, count = loss + float(out["loss"]) * n, correct + float(out["accuracy"]) * n, count + n
    return {"eval_loss": loss / count, "eval_accuracy": correct / count,
            "eval_error": 1.0 - correct / count}


def make_feed(config, mesh):
  """The input feed for ``config.data.name``: resident (digits, cifar10) or streamed (ImageNet)."""
  if config.data.name == "imagenet2012":
    return StreamedFeed(config, mesh)
  return ResidentFeed(config, mesh)


class _Runs:
  """The per-run side of a job (one run, or each run of a stack): its workdir (with its own
  config), checkpoint manager and metric writer; the state and metrics arrive stacked and leave
  per run."""

  def __init__(self, workdir: str, stack: RunStack):
    self.stack = stack
    self.workdirs = [r.workdir(workdir) for r in stack.runs]
    if jax.process_index() == 0:
      for w, r in zip(self.workdirs, stack.runs):
        workdir_lib.guard_resume(w, r.config)
    self.managers = [checkpoint.make_manager(w, r.config.checkpoint.max_to_keep)
                     for w, r in zip(self.workdirs, stack.runs)]
    self.writers: list[writers.MultiWriter] = []
    self._finite = jax.jit(stack.vmap(_all_finite, 0))

  def restore(self, state: TrainState) -> tuple[TrainState, int | None]:
    """Every run's newest checkpoint (and their step), or ``state`` (and None) when no run has
    one; a stack whose runs stand at different steps is refused (they share one step). Then
    each run's metrics log loses the rows after that step, and its writer opens."""
    restored = [checkpoint.restore_latest(m, s)
                for m, s in zip(self.managers, self.stack.split(state))]
    steps = [None if r is None else int(r.step) for r in restored]
    if len(set(steps)) > 1:
      where = ", ".join(f"{w}: {'no checkpoint' if s is None else f'step {s}'}"
                        for w, s in zip(self.workdirs, steps))
      raise ValueError(f"the runs of this stack stand at different steps ({where}); a "
                       "stack resumes only when all its runs are at one step: train the others "
                       "alone to that step, or start the stack in a new workdir")
    main = jax.process_index() == 0
    for w in self.workdirs:
      dropped = workdir_lib.trim_metrics(w, -1 if steps[0] is None else steps[0]) if main else 0
      if dropped:
        say(f"{w}/metrics.jsonl: dropped {dropped} rows written after step {steps[0] or 0} "
            "(they are written again)")
    self.writers = [writers.create_writer(w, enabled=main) for w in self.workdirs]
    return (state, None) if steps[0] is None else (self.stack.join(restored), steps[0])

  def write(self, step: int, per_run: list[dict]) -> None:
    for writer, scalars in zip(self.writers, per_run):
      writer.write_scalars(step, scalars)

  def check_finite(self, per_run: list[dict], step: int) -> None:
    for name, m, values in zip(self.stack.names, self.managers, per_run):
      if not math.isfinite(values["train_loss"]):
        self.wait()  # the checkpoint it names is committed
        what = f"training loss ({values['train_loss']})"
        raise _diverged(what + (f" of run {name}" if self.stack.stacked else ""), step, m)

  def save(self, step: int, state: TrainState) -> None:
    """Each run's checkpoint at ``step``, where it has none yet; a run whose parameters, BN
    statistics or optimizer state are not all finite is never saved (it would be resumed)."""
    finite = np.atleast_1d(np.asarray(self._finite(state)))
    for name, m, ok in zip(self.stack.names, self.managers, finite):
      if not ok:
        self.wait()  # the checkpoint it names is committed
        what = "parameters or statistics" + (f" of run {name}" if self.stack.stacked else "")
        raise _diverged(what, step, m)
    for m, s in zip(self.managers, self.stack.split(state)):
      if m.latest_step() != step:
        checkpoint.save(m, step, s)

  def wait(self) -> None:
    for m in self.managers:
      checkpoint.wait(m)
    for w in self.writers:
      w.flush()


def _train_scalars(stack: RunStack, collection: TrainMetrics) -> list[dict]:
  """``{train_loss, train_accuracy}`` of each run."""
  return [{f"train_{k}": float(v) for k, v in run.compute().items()}
          for run in stack.split_host(collection)]


def _progress_fields(per_run: list[dict]) -> dict:
  if len(per_run) == 1:
    return {"loss": per_run[0]["train_loss"], "acc": per_run[0]["train_accuracy"]}
  return {name: "/".join(f"{r[key]:.4g}" for r in per_run)
          for name, key in (("loss", "train_loss"), ("acc", "train_accuracy"))}


def check_config(config) -> nn.Module:
  """Every check of a training config that needs no data and writes nothing (fields, the runs
  of a stack, model, each run's gates), so a mistake costs seconds, not a data load; returns
  the model."""
  config_lib.validate(config)
  runs = runs_of(config)
  model = models.build(config.model, data_lib.num_classes(config.data.name))
  for run in runs:
    try:
      gates_lib.make_sampler(run.config.gates, model.layout, config.train.batch_size)
    except ValueError as e:
      raise ValueError(f"run {run.name}: {e}" if run.name else str(e)) from None
  return model


def run_eval_gates(stack: RunStack, layout) -> tuple[jax.Array | None, list[bool]]:
  """The gates of each run's test-time network as one argument (each run's expected gates,
  ones for a run evaluated unscaled; None when every run is), and which runs are scaled (they
  log the unscaled network beside, as they do alone)."""
  scaled = [gates_lib.eval_gates(r.config.gates, layout) for r in stack.runs]
  if all(g is None for g in scaled):
    return None, [False] * len(stack)
  ones = np.ones((layout.n_blocks,), np.float32)
  return stack.arg([ones if g is None else g for g in scaled], jnp.float32), [
      g is not None for g in scaled]


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config.model`` on ``config.data``; checkpoints, metrics and config in ``workdir``.

  Resumes from the newest checkpoint in the workdir. Returns the final evaluation metrics.
  With a stack of runs (``config.stack``, or two or more ``config.seeds``), trains them as one
  vmapped program (``stack.RunStack``), each in its ``workdir/NAME`` as if trained alone, and
  returns ``{name: final metrics}``. Raises ``Stopped`` after saving when SIGTERM or SIGINT
  arrives.

  Everything the config names (fields, model, gates, data) is checked before anything is
  written; then the workdir is locked (``workdir.lock``) for the whole run.
  """
  model = check_config(config)
  mesh = make_mesh()
  stack = RunStack(runs_of(config), mesh)
  tc = config.train
  check_divisible(tc.batch_size, mesh, "train.batch_size")
  sample_gates = gates_lib.make_stack_sampler([r.config.gates for r in stack.runs],
                                              model.layout, tc.batch_size)
  feed = make_feed(config, mesh)
  workdir_lib.check_path(workdir)
  with workdir_lib.lock(workdir, *(r.workdir(workdir) for r in stack.runs)):
    return _train(config, workdir, stack, model, feed, sample_gates)


def _train(config, workdir: str, stack: RunStack, model: nn.Module, feed,
           sample_gates) -> dict:
  """The training loop of ``train_and_evaluate``, in a validated and locked workdir."""
  mesh, tc = stack.mesh, config.train
  runs = _Runs(workdir, stack)
  tx, schedule = optim.make_optimizer(config.optim, tc.num_steps)
  state, resumed_at = runs.restore(stack.init(
      lambda seed: create_train_state_unsharded(model, tx, seed, feed.input_shape)))
  step = resumed_at or 0
  if resumed_at is not None:
    say(f"resumed from {workdir} at step {step}")
  if stack.stacked:
    say(f"training runs {', '.join(stack.names)} as one program, in " + ", ".join(runs.workdirs))

  def log_compile(what: str, seconds: float) -> None:
    runs.write(step, [{f"compile_s_{what}": seconds}] * len(stack))
    say(f"compiled {what} in {seconds:.1f}s")

  # Vmapped over runs, a block's cond would be a select over both branches: the multiply
  # form computes the same (tests/test_skip.py) without the conds.
  train_on_batch = make_train_on_batch(
      model, tx, feed.mean, feed.std, config.optim.label_smoothing, mesh,
      sample_gates=sample_gates,
      skip_compute=stack.runs[0].config.gates.skip_compute and not stack.stacked,
      conv_groups=tc.conv_groups)
  feed.start(model, train_on_batch, log_compile, stack)

  gates_at_test, scaled = run_eval_gates(stack, model.layout)

  def evaluate(state: TrainState) -> list[dict]:
    """Each run's test-time network (scaled by its expected gates when it samples gates), and
    the unscaled one beside it for those runs; one dict per run."""
    per_run = stack.per_run(feed.evaluate(state, gates_at_test))
    if gates_at_test is not None:
      unscaled = stack.per_run(feed.evaluate(state, None))
      for out, plain, has in zip(per_run, unscaled, scaled):
        out.update({f"{k}_unscaled": v for k, v in plain.items()} if has else {})
    return per_run

  param_norm = jax.jit(stack.vmap(optax.tree.norm, 0), out_shardings=replicated(mesh))
  progress = Progress(tc.num_steps, "train", start=step, every_s=tc.progress_every_s)
  report_progress = [writers.report_progress(tc.num_steps, w) for w in runs.writers]
  accumulated, last_log_time, last_log_step = None, time.perf_counter(), step
  finals: list[dict] = []
  with StopRequest() as stop:
    while step < tc.num_steps and not stop.received:
      k = min(tc.steps_per_call, tc.num_steps - step)
      previous = step
      state, batch_metrics = feed.train(state, k)
      step += k
      for report in report_progress:
        report(step, t=time.time())
      accumulated = batch_metrics if accumulated is None else accumulated.merge(batch_metrics)
      done = step == tc.num_steps
      if _crossed(step, previous, tc.log_every) or done:
        per_run = _train_scalars(stack, accumulated)
        runs.check_finite(per_run, step)
        now = time.perf_counter()
        shared = {"steps_per_s": (step - last_log_step) / (now - last_log_time),
                  "learning_rate": float(schedule(step - 1))}
        norms = stack.per_run({"param_norm": param_norm(state.params)})
        runs.write(step, [{**r, **shared, **n} for r, n in zip(per_run, norms)])
        progress.update(step, force=True, **_progress_fields(per_run))
        accumulated, last_log_time, last_log_step = None, now, step
      if _crossed(step, previous, tc.eval_every) or done:
        finals = evaluate(state)
        runs.write(step, finals)
        for name, final in zip(stack.names, finals):
          say(f"eval at step {step}{f' ({name})' if stack.stacked else ''}: "
              + " ".join(f"{k_} {v:.4f}" for k_, v in final.items()))
      if _crossed(step, previous, config.checkpoint.every) or done:
        runs.save(step, state)
    if stop.received:
      if accumulated is not None:
        runs.check_finite(_train_scalars(stack, accumulated), step)
      runs.save(step, state)
      runs.wait()
      raise Stopped(stop.received, step, tc.num_steps, runs.workdirs)
  runs.wait()
  if not finals:  # resumed a finished run
    finals = evaluate(state)
  for w, final in zip(runs.workdirs, finals):
    results.write_json(w, "final_metrics.json", {"step": step, **final})
  return dict(zip(stack.names, finals)) if stack.stacked else finals[0]
