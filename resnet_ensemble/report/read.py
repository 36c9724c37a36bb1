"""Every file the report reads, and what it says about the run that wrote it.

The report reads results only (JSON, and the metrics.jsonl training appends), never a
network: it can be rerun anywhere, and every number in it traces back to a result file.
Every input is optional; a missing file is None and the report says how to produce it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from resnet_ensemble import workdir as workdir_lib, writers
from resnet_ensemble.report import paper

NUM_CLASSES = {"cifar10": 10, "digits": 10, "imagenet2012": 1000}


def load(directory: str | None, name: str) -> dict | None:
  """The parsed JSON file, None if absent; a corrupt file is an error, not a silent gap."""
  if directory is None:
    return None
  path = workdir_lib.path(directory, name)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def history(workdir: str | None) -> list[dict]:
  """The run's metrics.jsonl (empty where it has none)."""
  path = workdir_lib.path(workdir, "metrics.jsonl") if workdir else None
  return writers.read_jsonl(str(path)) if path is not None and path.exists() else []


@dataclasses.dataclass(frozen=True)
class Runs:
  """The results of the main run and of the runs it is compared with (None: not there)."""
  workdir: str
  lesion: dict | None           # E1, E3, E4 (lesion.json)
  paths: dict | None            # E6, E7 (gradients.json, or an older paths.json)
  final: dict | None            # training (final_metrics.json)
  jpeg: dict | None             # the test-time JPEG probe (jpeg_gap.json)
  seeds: list[tuple[str, dict | None]]  # (workdir, final_metrics) of more seeds of the run
  seed_lesions: list[dict]      # the lesion.json of those seeds that have one
  vgg_workdir: str | None
  vgg: dict | None              # the plain network's lesion.json (E1's comparison)
  sd_workdir: str | None
  sd: dict | None               # the stochastic-depth run's lesion.json (E10)
  effective_workdir: str | None
  effective_final: dict | None  # the effective-path run's final_metrics.json (E8)


def read_runs(workdir: str, *, vgg_workdir: str | None, sd_workdir: str | None,
              effective_workdir: str | None, seed_workdirs: Sequence[str]) -> Runs:
  lesion = load(workdir, "lesion.json")
  pj = load(workdir, workdir_lib.gradients_file(workdir))
  final = load(workdir, "final_metrics.json")
  vgg = load(vgg_workdir, "lesion.json")
  sd = load(sd_workdir, "lesion.json")
  effective_final = load(effective_workdir, "final_metrics.json")
  jpeg = load(workdir, "jpeg_gap.json")
  seeds = [(wd, load(wd, "final_metrics.json")) for wd in seed_workdirs]
  seed_lesions = [x for x in (load(wd, "lesion.json") for wd in seed_workdirs) if x]
  return Runs(workdir=workdir, lesion=lesion, paths=pj, final=final, jpeg=jpeg, seeds=seeds,
              seed_lesions=seed_lesions,
              vgg_workdir=vgg_workdir, vgg=vgg, sd_workdir=sd_workdir, sd=sd,
              effective_workdir=effective_workdir, effective_final=effective_final)


def run_config(workdir: str | None) -> dict:
  """A run's own config.json ({} if none): what it was trained with."""
  return dict(load(workdir, "config.json") or {})


def config(result: dict | None) -> dict:
  """The run config stored in a result file ({} if none), as a plain dict."""
  return dict((result or {}).get("config") or {})


def data_name(result: dict | None) -> str:
  return str(config(result).get("data", {}).get("name", "cifar10"))


def chance_error(result: dict | None) -> float:
  """Error of a uniform guess: what 'chance level' means for this data set."""
  return 1.0 - 1.0 / NUM_CLASSES.get(data_name(result), 10)


def layout(lesion: dict) -> tuple[int, list[int]]:
  """Number of blocks and the 0-based downsampling blocks of a lesion result."""
  lay = lesion.get("layout") or {}
  n = lay.get("n_blocks")
  if n is None:
    n = len((lesion.get("single") or {}).get("error", []))
  return int(n), [int(i) for i in lay.get("downsampling", [])]


def is_plain(lesion: dict) -> bool:
  return lesion.get("model_kind") == "plain" or config(lesion).get("model", {}).get(
    "name") == "plain"


def model_label(lesion: dict | None, fallback: str = "ResNet") -> str:
  """ResNet-110 / VGG-15 style name: depth from the config, else from the block count."""
  if lesion is None:
    return fallback
  n, _ = layout(lesion)
  if is_plain(lesion):
    return f"VGG-{n + 2}"  # stem + n deletable layers + dense
  if config(lesion).get("weights"):
    arch = config(lesion).get("arch", "ResNet")
    if arch == "cifar":  # a CIFAR ResNet whose depth was read from the file: 2 layers a block
      arch = f"ResNet-{2 * n + 2}"
    return f"{arch} (pretrained)"
  depth = config(lesion).get("model", {}).get("depth")
  return f"ResNet-{depth}" if depth else f"ResNet ({n} blocks)"


def seed_of(workdir: str | None) -> str:
  """The seed in the run's config.json ("?" where there is none)."""
  return str((load(workdir, "config.json") or {}).get("seed", "?"))


def n_blocks(runs: Runs) -> tuple[int, str]:
  """The network's block count for the analytic figures (E5, E9), and where it came from:
  the analyses' own files first, then the run's config, else the paper's network."""
  if runs.paths and runs.paths.get("n"):
    return int(runs.paths["n"]), f"n from {workdir_lib.gradients_file(runs.workdir)}"
  if runs.lesion is not None:
    n, _ = layout(runs.lesion)
    if n:
      return n, "n from lesion.json"
  cfg = load(runs.workdir, "config.json") or {}
  model = cfg.get("model", {})
  if model.get("name", "cifar_resnet") == "cifar_resnet" and model.get("depth"):
    return (int(model["depth"]) - 2) // 2, "n from config.json"
  return paper.N, "no run data: the paper's n = 54"
