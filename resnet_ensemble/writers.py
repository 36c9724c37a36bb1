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


def _plain(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class JsonlWriter:
  """Appends ``{"step": s, "name": value, ...}`` lines to ``path``; flushed on every write."""

  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
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
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
