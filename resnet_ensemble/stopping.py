"""Stopping a training job on a signal: SIGTERM (a preempted VM) or SIGINT becomes a request
that the loop answers at its next step by saving every run's checkpoint, then ``Stopped``."""

from __future__ import annotations

import signal
import threading


class StopRequest:
  """Turns SIGTERM and SIGINT into a request to checkpoint and exit cleanly, for the ``with``
  block (the handlers before it come back after)."""

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
