"""Result files in the workdir: JSON written atomically (a crash never leaves half a file)."""

from __future__ import annotations

import json
import os


def config_dict(config) -> dict:
  return json.loads(config.to_json())


def write_json(workdir: str, name: str, payload: dict) -> str:
  """Writes ``workdir/name`` (process 0 only: every process computed the same payload)."""
  import jax
  path = os.path.join(workdir, name)
  if jax.process_index() != 0:
    return path
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  os.replace(tmp, path)
  return path


def read_json(workdir: str, name: str) -> dict | None:
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
