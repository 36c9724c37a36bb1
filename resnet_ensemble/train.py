"""Training: ``train_and_evaluate(config, workdir)``, the loop and the step.

One jitted program per job, over a data-parallel mesh: the state is replicated, every batch is
sharded on the 'data' axis. The batches come from a feed (``feeds``), the state from
``state``, the test error from ``evaluate``, each run's checkpoints and metrics go to its files
(``run_files``), a signal stops the loop (``stopping``); a stack of runs (``stack``) trains as
one vmapped program, each run in its own workdir.
"""

import time
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics

from resnet_ensemble import (blocks, config as config_lib, data as data_lib, gates as gates_lib,
                             optim, workdir as workdir_lib, writers)
from resnet_ensemble.augment import normalize
from resnet_ensemble.evaluate import cross_entropy, grouped_apply
from resnet_ensemble.feeds import make_feed
from resnet_ensemble.progress import Progress, say
from resnet_ensemble.run_files import RunFiles
from resnet_ensemble.sharding import make_mesh, replicated, sharded
from resnet_ensemble.stack import RunStack, runs_of
from resnet_ensemble.state import TrainState, create_train_state_unsharded
from resnet_ensemble.stopping import StopRequest, Stopped


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


def _crossed(step: int, previous: int, every: int) -> bool:
  return every > 0 and step // every != previous // every


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


def train_and_evaluate(config, workdir: str, dataset: data_lib.ImageDataset | None = None) -> dict:
  """Trains ``config.model`` on ``config.data``; checkpoints, metrics and config in ``workdir``.

  Resumes from the newest checkpoint in the workdir. Returns the final evaluation metrics.
  With a stack of runs (``config.stack``, or two or more ``config.seeds``), trains them as one
  vmapped program (``stack.RunStack``), each in its ``workdir/NAME`` as if trained alone, and
  returns ``{name: final metrics}``. Raises ``Stopped`` after saving when SIGTERM or SIGINT
  arrives.

  Everything the config names (fields, model, gates, data) is checked before anything is
  written (``config.check_config``, once per process); then the workdir is locked
  (``workdir.lock``) for the whole run. ``dataset``: ``config.data`` loaded already (the
  evaluation source ``--mode=all`` loads once for training and the analyses).
  """
  model = config_lib.check_config(config)
  config_lib.check_devices(config)
  mesh = make_mesh()
  stack = RunStack(runs_of(config), mesh)
  tc = config.train
  sample_gates = gates_lib.make_stack_sampler([r.config.gates for r in stack.runs],
                                              model.layout, tc.batch_size)
  feed = make_feed(config, mesh, dataset)
  workdir_lib.check_path(workdir)
  with workdir_lib.lock(workdir, *(r.workdir(workdir) for r in stack.runs)):
    return _train(config, workdir, stack, model, feed, sample_gates)


def _train(config, workdir: str, stack: RunStack, model: nn.Module, feed,
           sample_gates) -> dict:
  """The training loop of ``train_and_evaluate``, in a validated and locked workdir."""
  with RunFiles(workdir, stack) as runs:
    step, finals = _loop(config, workdir, stack, model, feed, sample_gates, runs)
    runs.write_final(step, finals)
  return dict(zip(stack.names, finals)) if stack.stacked else finals[0]


def _loop(config, workdir: str, stack: RunStack, model: nn.Module, feed, sample_gates,
          runs: RunFiles) -> tuple[int, list[dict]]:
  """Trains to ``train.num_steps`` (resuming from ``runs``), logging, evaluating and saving
  on the way; returns the last step and each run's final evaluation. Raises ``Stopped`` after
  saving when SIGTERM or SIGINT arrives."""
  mesh, tc = stack.mesh, config.train
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
    per_run = stack.per_run(feed.evaluate(state.variables, gates_at_test))
    if gates_at_test is not None:
      unscaled = stack.per_run(feed.evaluate(state.variables, None))
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
  return step, finals

