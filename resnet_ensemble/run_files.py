"""The files of each run a job trains: its checkpoints, its metrics log and its final metrics.

A job trains one run or a stack of them (``stack``); the state and metrics arrive stacked and
each run's share goes to its own workdir, as if it were trained alone. A checkpoint is saved
only when its state is finite, so a resume never starts from a diverged state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble import checkpoint, workdir as workdir_lib, writers
from resnet_ensemble.progress import say
from resnet_ensemble.stack import RunStack
from resnet_ensemble.state import TrainState


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


class RunFiles:
  """The per-run side of a job (one run, or each run of a stack): its workdir (with its own
  config), checkpoint manager and metric writer; the state and metrics arrive stacked and leave
  per run. A context manager: on leaving, the checkpoints are committed and the metric writers
  closed, however the loop ended."""

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

  def write_final(self, step: int, finals: list[dict]) -> None:
    """Each run's ``final_metrics.json``: what the analyses and the report call trained."""
    for w, final in zip(self.workdirs, finals):
      workdir_lib.write_json(w, "final_metrics.json", {"step": step, **final})

  def __enter__(self) -> "RunFiles":
    return self

  def __exit__(self, *exc) -> None:
    try:
      for m in self.managers:
        checkpoint.wait(m)
    finally:
      for w in self.writers:
        w.close()
      self.writers = []
