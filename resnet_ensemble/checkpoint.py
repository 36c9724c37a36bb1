"""Orbax checkpoints in ``workdir/checkpoints``: saved atomically, restored with care.

Orbax commits a checkpoint by renaming its finished temporary directory, so a crash mid-save
leaves the previous ones intact. What restoring adds:

- a checkpoint with another structure than the state asked for (another model, optimizer or
  code) is a ``CheckpointMismatchError`` naming the differing entries; nothing is renamed;
- a read that fails is retried (storage hiccups) before the checkpoint counts as unreadable;
- an unreadable checkpoint is called corrupt, and set aside as ``<step>.unreadable-<n>`` (kept,
  never deleted), only when an older checkpoint of the same run restores with the same code;
  when none restores, the workdir is refused with each step's error and nothing is renamed
  (the cause is more likely the environment than every file at once);
- set-aside checkpoints are named at every later start.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from resnet_ensemble.progress import say

READ_ATTEMPTS = 3
RETRY_DELAYS_S = (0.5, 2.0)
ASIDE = ".unreadable"


class CheckpointError(RuntimeError):
  """Checkpoints that exist but cannot be read, or a checkpoint that cannot be written."""


class CheckpointMismatchError(ValueError):
  """A checkpoint holds another structure than the state it is restored into."""


def quiet_orbax() -> None:
  """Orbax logs every file it writes (INFO) and a traceback per coroutine of a failed read or
  write (ERROR, hundreds of lines); the errors this module raises say it in one line."""
  for name in ("orbax", "orbax.checkpoint", "absl"):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.FATAL)
  except ImportError:
    pass


def _closed_loop_noise(e: BaseException | None) -> bool:
  """Orbax reads a checkpoint with asyncio: when one read fails, the restore returns and closes
  its event loop while the other reads are still in flight, and each of them reports "Event
  loop is closed" from a reader thread (a traceback apiece: thousands of lines for one
  damaged checkpoint, which ``restore_latest`` already reports in one line)."""
  return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


def _filter_closed_loop_noise() -> None:
  """Drops ``_closed_loop_noise`` in this process, reported either way (an unraisable error,
  or an error printed by a reader thread); every other error is passed on. Reads still in
  flight when the interpreter exits report it while Python shuts down, past any hook: after a
  failed read, what is printed to stderr during shutdown is dropped too (``_failed_read``)."""
  if getattr(sys.unraisablehook, "_resnet_ensemble", False):
    return
  unraisable, excepthook = sys.unraisablehook, sys.excepthook

  def on_unraisable(u):
    if not _closed_loop_noise(u.exc_value):
      unraisable(u)

  def on_exception(kind, value, tb):
    if not _closed_loop_noise(value):
      excepthook(kind, value, tb)

  on_unraisable._resnet_ensemble = True
  sys.unraisablehook, sys.excepthook = on_unraisable, on_exception


def _quiet_shutdown() -> None:
  """Sends stderr to /dev/null once the program is done (atexit), before Python shuts down."""
  try:
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
  except (OSError, ValueError):
    pass


def _failed_read() -> None:
  """A read failed: its in-flight siblings will report a closed event loop, now or at exit."""
  global _shutdown_quieted
  if not _shutdown_quieted:
    _shutdown_quieted = True
    atexit.register(_quiet_shutdown)


_shutdown_quieted = False


def make_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  _filter_closed_loop_noise()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  directory = workdir if "://" in workdir else os.path.abspath(workdir)
  # One item, handled as it was saved, so its metadata reads before any save of this process.
  manager = ocp.CheckpointManager(epath.Path(directory) / "checkpoints", options=options,
                                  item_handlers=ocp.StandardCheckpointHandler())
  aside = set_aside(manager)
  if aside:
    say(f"note: {len(aside)} unreadable checkpoint(s) were set aside in {manager.directory}: "
        f"{', '.join(aside)} (kept for inspection; delete them when no longer needed)")
  return manager


def set_aside(manager: ocp.CheckpointManager) -> list[str]:
  """The names of the checkpoints set aside as unreadable in ``manager``'s directory."""
  directory = epath.Path(manager.directory)
  if not directory.is_dir():
    return []
  return sorted(d.name for d in directory.iterdir() if ASIDE in d.name)


def _path_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _shapes(tree: Any) -> dict[str, tuple]:
  """``{"params/stem_conv/kernel": shape}``: container kinds ignored (orbax stores tuples as
  lists and dataclasses as dicts)."""
  return {"/".join(_path_name(e) for e in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def structure_differences(manager: ocp.CheckpointManager, step: int,
                          abstract_state: Any) -> list[str] | None:
  """What differs between checkpoint ``step`` and ``abstract_state`` (entries missing, extra or
  of another shape); None when the checkpoint's metadata cannot be read."""
  try:
    saved = _shapes(manager.item_metadata(step).tree)
  except Exception:  # noqa: BLE001 (orbax raises many types for unreadable metadata)
    return None
  wanted = _shapes(abstract_state)
  diffs = [f"{k}: in the checkpoint, not in this run's state" for k in sorted(set(saved) - set(wanted))]
  diffs += [f"{k}: in this run's state, not in the checkpoint" for k in sorted(set(wanted) - set(saved))]
  diffs += [f"{k}: shape {saved[k]} in the checkpoint, {wanted[k]} in this run's state"
            for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
  return diffs


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  args = ocp.args.StandardRestore(abstract_state)
  for attempt in range(READ_ATTEMPTS):
    try:
      return manager.restore(step, args=args)
    except Exception:  # noqa: BLE001
      _failed_read()
      if attempt == READ_ATTEMPTS - 1:
        raise
      time.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])
      manager.reload()


def _summary(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
  """The newest checkpoint that restores into ``abstract_state`` (None: no checkpoint at all).

  ``abstract_state`` None restores whatever was saved (tests, inspection), unchecked."""
  failures: list[tuple[int, BaseException]] = []
  for step in sorted(manager.all_steps(), reverse=True):
    if abstract_state is not None:
      diffs = structure_differences(manager, step, abstract_state)
      if diffs:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {manager.directory} holds another state than this run "
            f"makes ({len(diffs)} entries differ; another model, optimizer or code version?); "
            "nothing was changed. Use the run's own config, or a new workdir. Differences:\n  "
            + "\n  ".join(diffs[:12]) + ("\n  ..." if len(diffs) > 12 else ""))
    try:
      state = _restore(manager, step, abstract_state)
    except Exception as e:  # noqa: BLE001 (orbax raises many types for unreadable data)
      failures.append((step, e))
      continue
    if failures:
      _set_aside(manager, failures, step)
    return state
  if failures:
    raise CheckpointError(
        f"none of the {len(failures)} checkpoints in {manager.directory} could be read "
        f"({READ_ATTEMPTS} attempts each), so the run cannot resume; nothing was renamed or "
        "deleted. If the storage was unavailable, rerun; if the files are damaged, move them "
        "away to start again. Errors: "
        + "; ".join(f"step {s}: {_summary(e)}" for s, e in failures))
  return None


def _set_aside(manager: ocp.CheckpointManager, failures: list[tuple[int, BaseException]],
               restored: int) -> None:
  """Renames the unreadable checkpoints newer than ``restored`` out of the way of the saves
  that will recreate their steps."""
  for step, e in failures:
    path = epath.Path(manager.directory) / str(step)
    if jax.process_index() == 0:
      aside = _unused(str(path) + ASIDE)
      path.rename(aside)
      say(f"checkpoint step {step} in {manager.directory} is unreadable ({_summary(e)}) while "
          f"step {restored} reads: kept as {aside}")
    _sync(f"skip-{step}")
  manager.reload()


def _unused(prefix: str) -> str:
  n = 0
  while epath.Path(f"{prefix}-{n}").exists():
    n += 1
  return f"{prefix}-{n}"


def _sync(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # only multi-process runs need it
    multihost_utils.sync_global_devices(f"resnet_ensemble-{tag}")


def saved_config(manager: ocp.CheckpointManager) -> dict | None:
  """The config (JSON dict) the newest checkpoint that records one was saved with; None when
  none does (checkpoints of older code). Each checkpoint carries it, so the resume guard holds
  even where ``config.json`` was deleted."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      custom = manager.metadata(step).custom_metadata or {}
    except Exception:  # noqa: BLE001 (unreadable metadata: an older checkpoint may have it)
      continue
    if isinstance(custom.get("config"), dict):
      return custom["config"]
  return None


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: dict | None = None) -> None:
  """Starts writing checkpoint ``step`` (asynchronously), recording ``config`` (the run's JSON
  dict) in its metadata; a failure, here or in an earlier save still being written, is one
  CheckpointError naming the directory."""
  try:
    manager.save(int(step), args=ocp.args.StandardSave(state),
                 custom_metadata={"config": config} if config is not None else None)
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"could not write checkpoint step {step} (or the one before it, "
                          f"written in the background) in {manager.directory}: "
                          f"{_summary(e)}") from e


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the checkpoint being written; a failure is one CheckpointError."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"could not finish writing a checkpoint in {manager.directory}: "
                          f"{_summary(e)}") from e
