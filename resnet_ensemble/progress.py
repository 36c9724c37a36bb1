"""A progress line with rate and ETA for every long loop (training, sweeps, path sampling)."""

from __future__ import annotations

import sys
import time


def is_main_process() -> bool:
  """Only process 0 of a multi-process run prints progress and writes results."""
  import jax
  return jax.process_index() == 0


def say(message: str) -> None:
  """print(), on process 0 only."""
  if is_main_process():
    print(message, flush=True)


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Prints ``desc done/total (pct) rate/s ETA ... | extra`` at most every ``every_s`` seconds."""

  def __init__(self, total: int, desc: str, unit: str = "steps", every_s: float = 10.0,
               start: int = 0, stream=None):
    self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
    self.stream = stream or sys.stdout
    self._t0, self._done0, self._last = time.perf_counter(), start, 0.0

  def update(self, done: int, force: bool = False, **extra) -> None:
    now = time.perf_counter()
    if not force and now - self._last < self.every_s and done < self.total:
      return
    self._last = now
    rate = (done - self._done0) / max(now - self._t0, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    pct = 100.0 * done / max(self.total, 1)
    line = (f"{self.desc} {done}/{self.total} ({pct:.1f}%) {rate:.2f} {self.unit}/s "
            f"elapsed {format_duration(now - self._t0)} ETA "
            f"{format_duration(eta) if eta == eta else '?'}")
    if extra:
      line += " | " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in extra.items())
    if is_main_process():
      print(line, file=self.stream, flush=True)
