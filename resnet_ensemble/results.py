"""Files in the workdir: JSON written atomically, local paths or ``gs://`` alike (etils.epath).

Only process 0 writes: every process of a multi-process run computed the same payload."""

from __future__ import annotations

import json

from etils import epath


def config_dict(config) -> dict:
  return json.loads(config.to_json())


def path(workdir: str, *names: str) -> epath.Path:
  return epath.Path(workdir).joinpath(*names)


def is_main_process() -> bool:
  import jax
  return jax.process_index() == 0


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
