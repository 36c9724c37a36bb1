"""A run's workdir: its files (JSON written atomically), who may write it (a lock), which config it holds, and its metrics log.

The rules, in the order a job meets them:

1. ``check_path``: a workdir is a named directory (an empty ``--workdir=`` would write into the
   current directory) that can be created.
2. ``lock``: one writer per workdir. ``workdir/LOCK`` holds the owner's host, pid, start time
   and a nonce, and is touched every ``HEARTBEAT_S`` seconds while the owner runs. A second job
   refuses it, naming the owner. The lock is the owner's until it releases it: a live process
   of this host keeps it however old its heartbeat (a paused job continues); it is stale, and
   taken over with a message, when its owner is a process of this host that no longer exists,
   when its heartbeat is older than ``STALE_S`` (a crashed job on another host), or when it
   names no owner (an empty file: a start that could not write it). Before each write the
   owner checks its nonce is still there (``check_owner``) and stops with ``LockLostError``
   if not. In a multi-process run, process 0 holds it.
3. ``guard_resume``: a workdir that holds a run (a checkpoint) resumes only with that run's
   config (the one its checkpoints record, else ``config.json``), except the fields
   ``config.RESUME_MAY_CHANGE`` lists; ``check_analysis``: an
   analysis only needs the same network and data (``config.ANALYSIS_MUST_MATCH``).
4. ``trim_metrics``: a resumed run's metrics.jsonl loses the rows written after the checkpoint
   it resumes from (they will be written again).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from typing import Iterator

from etils import epath

from resnet_ensemble import config as config_lib
from resnet_ensemble.progress import is_main_process, say

LOCK_FILE = "LOCK"
HEARTBEAT_S = 30.0
STALE_S = 600.0
EMPTY_GRACE_S = 5.0  # a lock naming no owner: being written, or left empty by a failed start
CONFIG_FILE = "config.json"


# ---------------------------------------------------------------------------- files
# JSON written atomically, local paths or ``gs://`` alike (etils.epath). Only process 0 writes:
# every process of a multi-process run computed the same payload.

def config_dict(config) -> dict:
  return json.loads(config.to_json())


def path(workdir: str, *names: str) -> epath.Path:
  return epath.Path(workdir).joinpath(*names)


# E6's results (E6/E7 and the path counts). Runs written before the name said what the file
# holds call it paths.json (published results among them): readers take either.
GRADIENTS_FILE = "gradients.json"
OLD_GRADIENTS_FILE = "paths.json"


def gradients_file(workdir: str) -> str:
  """The name of E6's results in ``workdir``: gradients.json, or an older run's paths.json
  where only that exists."""
  if not path(workdir, GRADIENTS_FILE).exists() and path(workdir, OLD_GRADIENTS_FILE).exists():
    return OLD_GRADIENTS_FILE
  return GRADIENTS_FILE


def write_text(workdir: str, name: str, text: str) -> str:
  """Writes ``workdir/name`` via a temporary file and a rename (a crash leaves the old file),
  only while this job's lock on ``workdir`` is its own (``check_owner``)."""
  target = path(workdir, name)
  if is_main_process():
    check_owner(workdir)
    tmp = target.parent / (target.name + ".tmp")
    try:
      target.parent.mkdir(parents=True, exist_ok=True)
      tmp.write_text(text)
      tmp.replace(target)  # overwrites, unlike epath rename
    except OSError as e:
      with contextlib.suppress(OSError):
        tmp.unlink()
      raise WorkdirError(f"cannot write {target}: {e.strerror or e}") from e
  return str(target)


def write_json(workdir: str, name: str, payload: dict) -> str:
  return write_text(workdir, name, json.dumps(payload, indent=1))


def read_json(workdir: str, name: str) -> dict | None:
  """``workdir/name`` parsed (None: absent); a damaged file is a WorkdirError naming it."""
  target = path(workdir, name)
  if not target.exists():
    return None
  try:
    return json.loads(target.read_text())
  except ValueError as e:
    raise WorkdirError(f"{target} is not valid JSON ({e}); restore it or move it away") from e


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
_tokens: dict[str, dict] = {}  # lock path -> the owner record this process wrote there
_held_guard = threading.Lock()


class LockLostError(WorkdirError):
  """Another job took this job's lock (this one was paused, or the file was replaced): the job
  stops before writing anything more, and leaves the lock to its new owner."""


def _process_start(pid: int) -> str | None:
  """When process ``pid`` started (clock ticks since boot, Linux), None where unknown: with
  the pid it names one process, so a pid reused by a later process is not the owner."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _owner() -> dict:
  """This job's lock record: who holds it (host, pid), since when, and a nonce that tells this
  job's lock from any later one's."""
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "pid_start": _process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "nonce": uuid.uuid4().hex}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: alive
    return True
  return True


def _age(path: epath.Path) -> float | None:
  try:
    return time.time() - path.stat().mtime
  except FileNotFoundError:
    return None


def _stale_reason(path: epath.Path, owner: dict) -> str | None:
  """Why the lock at ``path`` (held by ``owner``) is stale, or None while its owner may still
  write. A live process of this host keeps its lock however old its heartbeat (a paused job,
  Ctrl-Z or a frozen container, writes again when it continues); a heartbeat's age only
  counts for another host, whose processes cannot be asked."""
  age = _age(path)
  if age is None:
    return "it was just released"
  if not owner:
    return (f"it names no owner (an empty or damaged file {age:.0f} s old: a start that could "
            "not write it, e.g. on a full disk)") if age > EMPTY_GRACE_S else None
  if owner.get("host") == socket.gethostname():
    pid = int(owner.get("pid", -1))
    if not _alive(pid):
      return f"its process {pid} no longer runs"
    if owner.get("pid_start") and _process_start(pid) not in (None, owner["pid_start"]):
      return f"its process {pid} ended (the pid now belongs to another process)"
    return None
  if age > STALE_S:
    return f"its heartbeat stopped {age / 60:.0f} min ago (more than {STALE_S / 60:.0f} min)"
  return None


def _create(path: epath.Path, owner: dict) -> bool:
  """Creates the lock file if absent; False when it exists. Atomic on local disks (O_EXCL);
  on object stores (gs://) a check then a write (two jobs started within the same second can
  both pass). A lock that cannot be written whole (a full disk) is removed again: an empty
  one would block the workdir."""
  text = json.dumps(owner)
  try:
    if "://" in str(path):
      if path.exists():
        return False
      path.write_text(text)
      return True
    try:
      fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    try:
      with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    except OSError:
      with contextlib.suppress(OSError):
        os.unlink(str(path))
      raise
  except OSError as e:
    raise WorkdirError(f"cannot write the lock {path}: {e.strerror or e}") from e
  return True


def _read_owner(path: epath.Path) -> dict:
  try:
    owner = json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return {}
  return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
  return (f"host {owner.get('host')}, pid {owner.get('pid')}, started {owner.get('started')}"
          if owner else "no owner named: an empty or damaged lock file")


def _acquire(path: epath.Path, owner: dict) -> None:
  for _ in range(5):
    if _create(path, owner):
      return
    holder = _read_owner(path)
    reason = _stale_reason(path, holder)
    if reason is None and not holder:  # being written this instant, or left empty: look again
      time.sleep(max(0.0, EMPTY_GRACE_S - (_age(path) or 0.0)) + 0.1)
      holder = _read_owner(path)
      reason = _stale_reason(path, holder)
    if reason is None:
      age = _age(path) or 0.0
      paused = (f"; its process is alive, so the lock stays its own although its heartbeat is "
                f"{age / 60:.0f} min old (a paused job continues writing)"
                if age > STALE_S else "")
      raise WorkdirError(
          f"the workdir {path.parent} is in use by another job ({_describe(holder)}{paused}): "
          f"one job writes a workdir at a time. Wait for it, or, if it is gone, delete {path} "
          f"(a lock whose owner stopped is taken over: same host, or no heartbeat for "
          f"{STALE_S / 60:.0f} min)")
    if _read_owner(path) != holder:  # changed while we looked: judge the new one
      continue
    print(f"taking over the stale lock {path} ({_describe(holder)}): {reason}", flush=True)
    with contextlib.suppress(FileNotFoundError):
      path.unlink()
  raise WorkdirError(f"could not take the lock {path}: other jobs keep taking it")


def _owns(p: str) -> bool:
  return _read_owner(epath.Path(p)).get("nonce") == _tokens[p]["nonce"]


def _heartbeat(path: epath.Path, stop: threading.Event) -> None:
  """Touches the lock while it is this job's; never a lock another job has taken."""
  while not stop.wait(HEARTBEAT_S):
    with _held_guard:
      if str(path) not in _tokens or not _owns(str(path)):
        return
    with contextlib.suppress(OSError):
      if "://" in str(path):
        path.write_text(path.read_text())
      else:
        os.utime(str(path))


def check_owner(workdir: str) -> None:
  """Before a write into ``workdir``: a LockLostError when this process locked it and the lock
  is no longer its own (another job took it over while this one was paused). A workdir this
  process did not lock (other processes of a multi-process run, a report elsewhere) passes."""
  p = str(path(workdir, LOCK_FILE))
  with _held_guard:
    if p not in _tokens or _owns(p):
      return
    holder = _read_owner(epath.Path(p))
    now = _describe(holder) if epath.Path(p).exists() else "deleted"
  raise LockLostError(
      f"the lock {p} is no longer this job's (now: {now}): another job took the workdir over "
      f"(or the lock was removed), most likely while this one was paused; stopping without "
      f"writing anything more to {workdir}. Let that job finish, then rerun this command to "
      "resume")


_deferring = 0  # > 0 while the lock is being taken or released (main thread)
_pending: list[int] = []  # the stop signals that arrived meanwhile


def defer_signal(signum: int) -> bool:
  """For a stop-signal handler: True (and the signal kept for later) while the lock is being
  taken or released; it is raised again as soon as that is done, so a stop never leaves a lock
  this process made but does not know it holds, nor half removes one."""
  if _deferring and threading.current_thread() is threading.main_thread():
    _pending.append(signum)
    return True
  return False


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
  global _deferring
  _deferring += 1
  try:
    yield
  finally:
    _deferring -= 1
    if not _deferring and _pending:
      signum = _pending.pop()
      _pending.clear()
      signal.raise_signal(signum)


def _release(p: str) -> None:
  """Removes the lock ``p`` if it is still this process's (never another job's)."""
  if _owns(p):
    with contextlib.suppress(FileNotFoundError):
      epath.Path(p).unlink()
  del _tokens[p]


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
      with _signals_deferred(), _held_guard:
        count = _held.get(p, 0)
        if count == 0:
          epath.Path(p).parent.mkdir(parents=True, exist_ok=True)
          owner = _owner()
          _acquire(epath.Path(p), owner)
          _tokens[p] = owner
          threading.Thread(target=_heartbeat, args=(epath.Path(p), stop), daemon=True).start()
        _held[p] = count + 1
        taken.append(p)
    yield
  finally:
    stop.set()
    with _signals_deferred(), _held_guard:
      for p in reversed(taken):
        _held[p] -= 1
        if _held[p] == 0:
          del _held[p]
          _release(p)


# ----------------------------------------------------------------------------- the config


def config_differences(old: dict, new: dict, compared, base=None) -> list[str]:
  """``"field: workdir has A, this command has B"`` for each ``compared(field)`` that differs
  between a stored config and a new one; ``base``: the base config whose defaults fill fields
  ``old`` predates (default the ResNets', ``config.base_config``)."""
  # A field added after the workdir's run was started has its default there (defaults keep
  # the behaviour from before the field existed); a field the code has since removed cannot be
  # set by any command, so it is not compared (config.removed_fields).
  base = config_lib.base_config() if base is None else base
  a = {**config_lib.flatten(base), **config_lib.flatten(old)}
  b = config_lib.flatten(new)
  removed = set(config_lib.removed_fields(old, base)) - set(b)
  return [f"{k}: workdir has {a.get(k)!r}, this command has {b.get(k)!r}"
          for k in sorted((set(a) | set(b)) - removed) if compared(k) and a.get(k) != b.get(k)]


def _refuse(workdir: str, what: str, diffs: list[str]) -> None:
  raise ConfigMismatchError(
      f"the workdir {workdir} holds a run with another {what}; use a new workdir or the run's "
      f"own settings (--config=configs/run.py:{workdir} reads them from its {CONFIG_FILE}). "
      "Differences:\n  " + "\n  ".join(diffs))


def _checkpoint_names(workdir: str) -> list[str]:
  directory = path(workdir, "checkpoints")
  return [d.name for d in directory.iterdir()] if directory.is_dir() else []


def holds_run(workdir: str) -> bool:
  """Does ``workdir`` hold a run's state (a checkpoint, even one set aside as unreadable)?"""
  return any(name.split(".")[0].isdigit() for name in _checkpoint_names(workdir))


def trained(workdir: str, num_steps: int) -> bool:
  """Has the run in ``workdir`` finished ``num_steps`` steps, its final evaluation written too?
  A stop between the last checkpoint and ``final_metrics.json`` is not finished: resuming at
  that checkpoint only evaluates and writes it."""
  latest = latest_step(workdir)
  final = read_json(workdir, "final_metrics.json") or {}
  return latest is not None and latest >= num_steps and final.get("step") == latest


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint step in ``workdir``, by name, without reading it (None: none)."""
  return max((int(name) for name in _checkpoint_names(workdir) if name.isdigit()), default=None)


def _recorded_config(workdir: str, saved: dict | None) -> dict | None:
  """The config the workdir's run was started with: the one its checkpoints record
  (``saved``), else ``config.json``. A ``config.json`` missing beside a recorded config is
  written back from it, so ``configs/run.py:WORKDIR`` reads the run's settings again."""
  if saved is not None:
    if not path(workdir, CONFIG_FILE).exists():
      write_text(workdir, CONFIG_FILE, json.dumps(saved, indent=2, sort_keys=True))
      say(f"{path(workdir, CONFIG_FILE)} was missing: written back from the config its "
          "checkpoints record")
    return saved
  return read_json(workdir, CONFIG_FILE)


def guard_resume(workdir: str, config, saved: dict | None = None) -> None:
  """Refuses to resume the run in ``workdir`` with a config that changes what it computes
  (every field but ``config.RESUME_MAY_CHANGE``), then writes ``config.json``: at the first
  start, or over the config of an attempt that saved no checkpoint (nothing to resume).
  ``saved``: the config the newest checkpoint records (``checkpoint.saved_config``), the
  reference when present; deleting ``config.json`` does not switch the guard off."""
  new = config_dict(config)
  if holds_run(workdir):
    old = _recorded_config(workdir, saved)
    if old is None:
      say(f"note: {workdir} records no config for its checkpoints (no {CONFIG_FILE}, "
          "checkpoints of older code): only their structure is checked on resume")
    else:
      diffs = config_differences(old, new, lambda k: not config_lib.covered(
          k, config_lib.RESUME_MAY_CHANGE))
      if diffs:
        _refuse(workdir, "config", diffs)
  write_text(workdir, CONFIG_FILE, json.dumps(new, indent=2, sort_keys=True))


def check_analysis(workdir: str, config, saved: dict | None = None) -> None:
  """Refuses to analyse the run in ``workdir`` as another network or dataset: a checkpoint
  restored into another architecture fails with an opaque shape error (or, worse, loads).
  ``saved``: the config its checkpoints record, else ``config.json`` is compared."""
  old = saved if saved is not None else read_json(workdir, CONFIG_FILE)
  if old is None:
    return
  diffs = config_differences(old, config_dict(config), lambda k: config_lib.covered(
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
