"""Training: ``train_and_evaluate(config, workdir)``, the loop and the step.

One jitted program per job, over a data-parallel mesh: the state is replicated, every batch is
sharded on the 'data' axis. The batches come from a feed (``feeds``), the state from
``state``, the test error from ``evaluate``; a stack of runs (``stack``) trains as one vmapped
program, each run in its own workdir.
"""

import math
import signal
import threading
import time
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics

from resnet_ensemble import (blocks, checkpoint, config as config_lib, data as data_lib,
                             gates as gates_lib, models, optim, workdir as workdir_lib, writers)
from resnet_ensemble.augment import normalize
from resnet_ensemble.evaluate import cross_entropy, grouped_apply
from resnet_ensemble.feeds import make_feed
from resnet_ensemble.progress import Progress, say
from resnet_ensemble.sharding import check_divisible, make_mesh, replicated, sharded
from resnet_ensemble.stack import RunStack, runs_of
from resnet_ensemble.state import TrainState, create_train_state_unsharded


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  accuracy: metrics.Accuracy


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
  ``skip_compute``: whether a block gated off for the whole batch is skipped, decided by
  ``blocks.should_skip``. ``conv_groups``: see ``grouped_apply``."""
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


class _Runs:
  """The per-run side of a job (one run, or each run of a stack): its workdir (with its own
  config), checkpoint manager and metric writer; the state and metrics arrive stacked and leave
  per run."""

  def __init__(self, workdir: str, stack: RunStack):
    self.stack = stack
    self.workdirs = [r.workdir(workdir) for r in stack.runs]
    self.managers = [checkpoint.make_manager(w, r.config.checkpoint.max_to_keep)
                     for w, r in zip(self.workdirs, stack.runs)]
    if jax.process_index() == 0:
      for w, r, m in zip(self.workdirs, stack.runs, self.managers):
        workdir_lib.guard_resume(w, r.config, saved=checkpoint.saved_config(m))
    self.configs = [workdir_lib.config_dict(r.config) for r in stack.runs]
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

  def check_owner(self) -> None:
    """Each run's workdir is still this job's (``workdir.check_owner``), before a write."""
    for w in self.workdirs:
      workdir_lib.check_owner(w)

  def write(self, step: int, per_run: list[dict]) -> None:
    self.check_owner()
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
    self.check_owner()
    for m, s, c in zip(self.managers, self.stack.split(state), self.configs):
      if m.latest_step() != step:
        checkpoint.save(m, step, s, c)

  def wait(self) -> None:
    for m in self.managers:
      checkpoint.wait(m)
    for w in self.writers:
      w.flush()


def _say_partial_row(step: int, log_every: int, num_steps: int) -> None:
  """A resume between two log steps: the next row's training loss and accuracy average only
  the steps since the resume (the row carries ``train_steps``), since the ones before it were
  in a row written after the checkpoint (dropped)."""
  if log_every <= 0 or step % log_every == 0 or step >= num_steps:
    return
  row = min(num_steps, (step // log_every + 1) * log_every)
  say(f"note: the training row at step {row} averages the {row - step} steps since the resume "
      f"(train_steps={row - step}); steps {step // log_every * log_every + 1}..{step} were "
      "trained before it and their training loss is not logged")


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


def check_devices(config) -> None:
  """The batches split evenly over the devices (training's and its evaluation's), checked
  before the workdir is written."""
  mesh = make_mesh()
  check_divisible(config.train.batch_size, mesh, "train.batch_size")
  check_divisible(config.eval.batch_size, mesh, "eval.batch_size")


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
  check_devices(config)
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
    _say_partial_row(step, tc.log_every, tc.num_steps)
  if stack.stacked:
    say(f"training runs {', '.join(stack.names)} as one program, in " + ", ".join(runs.workdirs))

  def log_compile(what: str, seconds: float) -> None:
    runs.write(step, [{f"compile_s_{what}": seconds}] * len(stack))
    say(f"compiled {what} in {seconds:.1f}s")

  train_on_batch = make_train_on_batch(
      model, tx, feed.mean, feed.std, config.optim.label_smoothing, mesh,
      sample_gates=sample_gates,
      skip_compute=blocks.should_skip(stack.runs[0].config.gates.skip_compute,
                                      sampled=sample_gates is not None, vmapped=stack.stacked),
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
        if step - last_log_step != tc.log_every:  # after a resume, or the last row
          shared["train_steps"] = step - last_log_step
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
    workdir_lib.write_json(w, "final_metrics.json", {"step": step, **final})
  return dict(zip(stack.names, finals)) if stack.stacked else finals[0]
