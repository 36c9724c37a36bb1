"""Orbax checkpoints in ``workdir/checkpoints``, resumed automatically, with a config guard."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from resnet_ensemble import results


class ConfigMismatchError(ValueError):
  """The workdir was made by a run whose model/data config differs from this one."""


def _as_dict(config) -> dict:
  return json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)


def check_config(workdir: str, config, keys=("model", "data")) -> None:
  """Refuses a config whose model or data section differs from the one the workdir was made
  with: a checkpoint restored into another architecture would fail with an opaque shape error
  (or, worse, load)."""
  old = results.read_json(workdir, "config.json")
  if old is None:
    return
  new = _as_dict(config)
  diffs = [f"{k}.{field}: workdir has {old.get(k, {}).get(field)!r}, config has {v!r}"
           for k in keys for field, v in new.get(k, {}).items()
           if field not in _RUNTIME_FIELDS and old.get(k, {}).get(field) != v]
  if diffs:
    raise ConfigMismatchError(
        f"the workdir {workdir} holds a run with another model/data config; use a new workdir "
        "or the original config. Differences:\n  " + "\n  ".join(diffs))


# Fields that change how a run executes, not what network or data it is about.
_RUNTIME_FIELDS = ("dir", "source", "unroll", "dtype", "stream_dtype")


def guard_config(workdir: str, config) -> None:
  """``check_config``, then (re)writes ``workdir/config.json`` atomically."""
  check_config(workdir, config)
  results.write_text(workdir, "config.json",
                     json.dumps(_as_dict(config), indent=2, sort_keys=True))


def make_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  directory = workdir if "://" in workdir else os.path.abspath(workdir)
  return ocp.CheckpointManager(results.path(directory, "checkpoints"), options=options)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
  """The newest readable checkpoint restored into ``abstract_state``'s structure, or None.

  A newest checkpoint that cannot be read (a partial write, a corrupt file) is skipped with a
  message and renamed ``<step>.unreadable-<n>`` (kept, never deleted, and out of the way of the
  save that will recreate that step); the previous good one is used."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax raises many types for unreadable data
      path = epath.Path(manager.directory) / str(step)
      if jax.process_index() == 0:
        aside = _unused(str(path) + ".unreadable")
        path.rename(aside)
        print(f"checkpoint step {step} in {manager.directory} is unreadable "
              f"({type(e).__name__}: {str(e)[:200]}); kept as {aside}, trying the previous one",
              flush=True)
      _sync(f"skip-{step}")
      manager.reload()
  return None


def _unused(prefix: str) -> str:
  n = 0
  while epath.Path(f"{prefix}-{n}").exists():
    n += 1
  return f"{prefix}-{n}"


def _sync(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"resnet_ensemble-{tag}")


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  manager.save(int(step), args=ocp.args.StandardSave(state))
