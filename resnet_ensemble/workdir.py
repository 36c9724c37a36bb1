"""A run's workdir: its files (JSON written atomically), who may write it (a lock), which config it holds, and its metrics log.

The rules, in the order a job meets them:

1. ``check_path``: a workdir is a named directory (an empty ``--workdir=`` would write into the
   current directory) that can be created.
2. ``lock``: one writer per workdir. ``workdir/LOCK`` holds the owner's host, pid and start time
   and is touched every ``HEARTBEAT_S`` seconds while the owner runs. A second job refuses it,
   naming the owner. A lock is stale, and is taken over with a message, when its owner is a
   process of this host that no longer exists, or when its heartbeat is older than ``STALE_S``
   (a crashed job on another host). In a multi-process run, process 0 holds it.
3. ``guard_resume``: a workdir that holds a run (a checkpoint) resumes only with that run's
   config, except the fields ``config.RESUME_MAY_CHANGE`` lists; ``check_analysis``: an
   analysis only needs the same network and data (``config.ANALYSIS_MUST_MATCH``).
4. ``trim_metrics``: a resumed run's metrics.jsonl loses the rows written after the checkpoint
   it resumes from (they will be written again).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Iterator

from etils import epath

from resnet_ensemble import config as config_lib
from resnet_ensemble.progress import is_main_process

LOCK_FILE = "LOCK"
HEARTBEAT_S = 30.0
STALE_S = 600.0
CONFIG_FILE = "config.json"


# ---------------------------------------------------------------------------- files
# JSON written atomically, local paths or ``gs://`` alike (etils.epath). Only process 0 writes:
# every process of a multi-process run computed the same payload.

def config_dict(config) -> dict:
  return json.loads(config.to_json())


def path(workdir: str, *names: str) -> epath.Path:
  return epath.Path(workdir).joinpath(*names)


def write_text(workdir: str, name: str, text: str) -> str:
  """Writes ``workdir/name`` via a temporary file and a rename (a crash leaves the old file)."""
  target = path(workdir, name)
  if is_main_process():
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / (target.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(target)  # overwrites, unlike epath rename
  return str(target)


def write_json(workdir: str, name: str, payload: dict) -> str:
  return write_text(workdir, name, json.dumps(payload, indent=1))


def read_json(workdir: str, name: str) -> dict | None:
  target = path(workdir, name)
  if not target.exists():
    return None
  return json.loads(target.read_text())


# ---------------------------------------------------------------------------- rules

class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked (locked, unwritable, holding another run)."""


class ConfigMismatchError(ValueError):
  """The workdir holds a run made with another config."""


def check_path(workdir: str | None) -> str:
  """``workdir``, refused when empty or not creatable as a directory."""
  if not workdir or not str(workdir).strip():
    raise WorkdirError("--workdir is empty: name the directory for checkpoints and results")
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create the workdir {workdir}: {e.strerror or e}") from e
  return workdir


# ----------------------------------------------------------------------------- the lock

_held: dict[str, int] = {}  # lock path -> how many times this process holds it
_held_guard = threading.Lock()


def _owner() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: alive
    return True
  return True


def _stale_reason(path: epath.Path, owner: dict) -> str | None:
  """Why the lock at ``path`` (held by ``owner``) is stale, or None while its owner lives."""
  if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
    return f"its process {owner.get('pid')} no longer runs"
  try:
    age = time.time() - path.stat().mtime
  except FileNotFoundError:
    return "it was just released"
  if age > STALE_S:
    return f"its heartbeat stopped {age / 60:.0f} min ago (more than {STALE_S / 60:.0f} min)"
  return None


def _create(path: epath.Path, owner: dict) -> bool:
  """Creates the lock file if absent; False when it exists. Atomic on local disks (O_EXCL);
  on object stores (gs://) a check then a write (two jobs started within the same second can
  both pass)."""
  text = json.dumps(owner)
  if "://" in str(path):
    if path.exists():
      return False
    path.write_text(text)
    return True
  try:
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True


def _read_owner(path: epath.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return {}


def _acquire(path: epath.Path) -> None:
  owner = _owner()
  for _ in range(3):
    if _create(path, owner):
      return
    holder = _read_owner(path)
    reason = _stale_reason(path, holder)
    if reason is None:
      raise WorkdirError(
          f"the workdir {path.parent} is in use by another job (host {holder.get('host')}, pid "
          f"{holder.get('pid')}, started {holder.get('started')}): one job writes a workdir at "
          f"a time. Wait for it, or, if it is gone, delete {path} (a lock whose owner stopped "
          f"is taken over: same host, or no heartbeat for {STALE_S / 60:.0f} min)")
    print(f"taking over the stale lock {path} (held by host {holder.get('host')}, pid "
          f"{holder.get('pid')}): {reason}", flush=True)
    with contextlib.suppress(FileNotFoundError):
      path.unlink()
  raise WorkdirError(f"could not take the lock {path}: other jobs keep taking it")


def _heartbeat(path: epath.Path, stop: threading.Event) -> None:
  while not stop.wait(HEARTBEAT_S):
    with contextlib.suppress(OSError):
      if "://" in str(path):
        path.write_text(path.read_text())
      else:
        os.utime(str(path))


@contextlib.contextmanager
def lock(*workdirs: str) -> Iterator[None]:
  """Holds the lock of each workdir (process 0 only) for the ``with`` block. Re-entrant within
  a process (``--mode=all`` holds it around training, which takes it again)."""
  import jax
  if jax.process_index() != 0:
    yield
    return
  paths = list(dict.fromkeys(str(path(w, LOCK_FILE)) for w in workdirs))
  taken: list[str] = []
  stop = threading.Event()
  try:
    for p in paths:
      with _held_guard:
        count = _held.get(p, 0)
        if count == 0:
          epath.Path(p).parent.mkdir(parents=True, exist_ok=True)
          _acquire(epath.Path(p))
          threading.Thread(target=_heartbeat, args=(epath.Path(p), stop), daemon=True).start()
        _held[p] = count + 1
      taken.append(p)
    yield
  finally:
    stop.set()
    for p in reversed(taken):
      with _held_guard:
        _held[p] -= 1
        if _held[p] == 0:
          del _held[p]
          with contextlib.suppress(FileNotFoundError):
            epath.Path(p).unlink()


# ----------------------------------------------------------------------------- the config


def _differences(old: dict, new: dict, compared) -> list[str]:
  # A field added after the workdir's run was started has its default there (defaults keep
  # the behaviour from before the field existed).
  a = {**config_lib.flatten(config_lib.base_config()), **config_lib.flatten(old)}
  b = config_lib.flatten(new)
  return [f"{k}: workdir has {a.get(k)!r}, this command has {b.get(k)!r}"
          for k in sorted(set(a) | set(b)) if compared(k) and a.get(k) != b.get(k)]


def _refuse(workdir: str, what: str, diffs: list[str]) -> None:
  raise ConfigMismatchError(
      f"the workdir {workdir} holds a run with another {what}; use a new workdir or the run's "
      f"own settings ({CONFIG_FILE} there). Differences:\n  " + "\n  ".join(diffs))


def _checkpoint_names(workdir: str) -> list[str]:
  directory = path(workdir, "checkpoints")
  return [d.name for d in directory.iterdir()] if directory.is_dir() else []


def holds_run(workdir: str) -> bool:
  """Does ``workdir`` hold a run's state (a checkpoint, even one set aside as unreadable)?"""
  return any(name.split(".")[0].isdigit() for name in _checkpoint_names(workdir))


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint step in ``workdir``, by name, without reading it (None: none)."""
  return max((int(name) for name in _checkpoint_names(workdir) if name.isdigit()), default=None)


def guard_resume(workdir: str, config) -> None:
  """Refuses to resume the run in ``workdir`` with a config that changes what it computes
  (every field but ``config.RESUME_MAY_CHANGE``), then writes ``config.json``: at the first
  start, or over the config of an attempt that saved no checkpoint (nothing to resume)."""
  old = read_json(workdir, CONFIG_FILE)
  new = config_dict(config)
  if old is not None and holds_run(workdir):
    diffs = _differences(old, new, lambda k: not config_lib.covered(
        k, config_lib.RESUME_MAY_CHANGE))
    if diffs:
      _refuse(workdir, "config", diffs)
  write_text(workdir, CONFIG_FILE, json.dumps(new, indent=2, sort_keys=True))


def check_analysis(workdir: str, config) -> None:
  """Refuses to analyse the run in ``workdir`` as another network or dataset: a checkpoint
  restored into another architecture fails with an opaque shape error (or, worse, loads)."""
  old = read_json(workdir, CONFIG_FILE)
  if old is None:
    return
  diffs = _differences(old, config_dict(config), lambda k: config_lib.covered(
      k, config_lib.ANALYSIS_MUST_MATCH) and not config_lib.covered(
          k, config_lib.ANALYSIS_MAY_CHANGE))
  if diffs:
    _refuse(workdir, "model/data config", diffs)


# ----------------------------------------------------------------------------- metrics


def trim_metrics(workdir: str, step: int) -> int:
  """Drops the rows of ``workdir/metrics.jsonl`` written after ``step`` (a resumed run writes
  them again); returns how many. Rewritten atomically."""
  log = path(workdir, "metrics.jsonl")
  if not log.exists():
    return 0
  lines = log.read_text().splitlines(True)
  kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
  if len(kept) != len(lines):
    write_text(workdir, "metrics.jsonl", "".join(kept))
  return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
  """A row's step; None for a blank line or one torn by a crash mid-write."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None
