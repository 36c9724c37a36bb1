"""Metric writers: JSON lines in the workdir always; CLU's TensorBoard writer where TF exists.

CLU's ``metric_writers`` package imports TensorFlow at import time, and the GPU image has no
TensorFlow, so the JSONL writer here does not depend on it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import numpy as np
from etils import epath


def _plain(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class JsonlWriter:
  """Appends ``{"step": s, "name": value, ...}`` lines to ``path``, flushed on every write.

  Object stores (``gs://``) cannot append: there the file is rewritten whole on each write
  (metrics files are small: one line per log step)."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._remote = "://" in path
    if self._remote:
      self._lines = self.path.read_text().splitlines(True) if self.path.exists() else []
    else:
      self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    line = json.dumps(record) + "\n"
    try:
      if self._remote:
        self._lines.append(line)
        self.path.write_text("".join(self._lines))
      else:
        self._file.write(line)
        self._file.flush()
    except OSError as e:  # a full disk: name the file
      raise OSError(e.errno, e.strerror, str(self.path)) from e

  def flush(self) -> None:
    if not self._remote:
      self._file.flush()

  def close(self) -> None:
    if not self._remote:
      self._file.close()


class MultiWriter:
  def __init__(self, writers, clu_writer=None):
    self.writers = list(writers)
    self.clu_writer = clu_writer  # CLU's TensorBoard writer, where TensorFlow is installed

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    for w in self.writers:
      w.close()


def create_writer(workdir: str, enabled: bool = True):
  """JSONL (``workdir/metrics.jsonl``) plus CLU's TensorBoard writer when TensorFlow imports.

  ``enabled=False`` (processes other than 0) gives a writer that drops everything.
  """
  if not enabled:
    return MultiWriter([])
  writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
  try:
    from clu import metric_writers  # imports TensorFlow
    clu_writer = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
    writers.append(clu_writer)
  except ImportError:
    logging.info("TensorFlow not installed: metrics go to metrics.jsonl only")
    clu_writer = None
  return MultiWriter(writers, clu_writer)


def report_progress(num_steps: int, writer: MultiWriter):
  """CLU's ``ReportProgress`` (steps/s and ETA to TensorBoard) where TensorFlow is installed,
  else a no-op; called with the step after every compiled call."""
  if writer.clu_writer is None:
    return lambda step, **_: None
  from clu import periodic_actions
  action = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer.clu_writer)
  return lambda step, **kw: action(step, **kw)


def read_jsonl(path: str) -> list[dict]:
  """Every row of a JSON-lines file; a damaged row is a ValueError naming the file and line,
  except a last row without its newline (torn by a crash mid-write; a resume drops it too)."""
  text = epath.Path(path).read_text()
  lines = text.splitlines()
  rows = []
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except ValueError as e:
        if number == len(lines) and not text.endswith("\n"):
          break
        raise ValueError(f"{path}, line {number}, is not valid JSON ({e})") from e
  return rows
