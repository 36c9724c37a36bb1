"""Several runs trained as one program: the train step vmapped over a stack of runs.

Why: at the paper's batch of 128 a ResNet-110 step is launch-bound on a GPU (many small
kernels, the device partly idle), so K runs vmapped into one step launch about the same
kernels, each K times larger: the seeds the paper's error bars need, or E8's and E10's gated
models beside them, in one program (bench/train_step.py measures what it saves). Vmapping a convolution over its weights makes it one
grouped convolution.

The runs of a stack share the model, data, optimiser and steps; each has its own seed and gate
sampler (``config.stack``: "NAME:seed=S,gates.KEY=VALUE,..."; ``config.seeds``: runs that
differ only in seed). Gates are data, so runs of different samplers (none, effective paths,
stochastic depth) train in one step: each draws its own sampler's gates from its own key
(``gates.make_stack_sampler``) and computes every block in the multiply form.

Each run keeps everything a run trained alone has: its seed (initialisation, batch order,
augmentation, gates), its workdir with its own single-run config.json, checkpoints, metrics and
final metrics. The numbers are those of training it alone (tests/test_stack.py), so any run of a
stack can be resumed, analysed or published alone. One run is not a stack: nothing is vmapped.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnet_ensemble import config as config_lib
from resnet_ensemble.sharding import on_host, put_tree, replicated

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TYPE = {bool: "a bool (true or false)", int: "an int", float: "a float", str: "a string"}


class Run(NamedTuple):
  """One run of a stack: its name (its workdir under the stack's; "" for a single run, which
  is the workdir itself) and its own config, a single run's (``seeds`` and ``stack`` empty)."""
  name: str
  config: Any

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.name) if self.name else root


def runs_of(config) -> list[Run]:
  """The runs ``config`` trains: one per ``config.stack`` entry, one per ``config.seeds``
  (``seed{s}``; a single seed is a single run), else the single run of ``config.seed``. Each
  stack entry is "NAME" or "NAME:KEY=VALUE,...", KEY ``seed`` or a ``gates.`` field: a run
  differs from the others only in what the step takes as data. Raises a ValueError naming the
  entry for anything else."""
  seeds, entries = tuple(config.get("seeds", ())), tuple(config.get("stack", ()))
  if seeds and entries:
    raise ValueError("--config.seeds and --config.stack both name the runs of a stack: use one "
                     '(a stack entry sets its run\'s seed: "NAME:seed=S")')
  if entries:
    runs = [_parse(config, str(e)) for e in entries]
  elif len(seeds) > 1:
    if len(set(seeds)) != len(seeds):
      raise ValueError(f"seeds {seeds} repeat a seed: each run needs its own")
    runs = [Run(f"seed{s}", _single(config, {"seed": s})) for s in seeds]
  else:
    return [Run("", _single(config, {"seed": seeds[0] if seeds else config.seed}))]
  names = [r.name for r in runs]
  for i, run in enumerate(runs):
    if run.name in names[:i]:
      raise ValueError(f"--config.stack: the run name {run.name!r} repeats: each run needs its "
                       "own workdir")
    twin = next((r for r in runs[:i] if r.config.to_dict() == run.config.to_dict()), None)
    if twin is not None:
      raise ValueError(f"--config.stack: runs {twin.name!r} and {run.name!r} are the same run "
                       "(same seed and gates): give one a seed or gates of its own")
  return runs


def _single(config, overrides: Mapping[str, Any]):
  """``config`` as a single run's, with ``overrides`` ({"seed": 1, "gates.k": 23})."""
  c = config.copy_and_resolve_references()
  c.seeds, c.stack = (), ()
  for key, value in overrides.items():
    config_lib.override(c, key, value)
  return c


def _parse(config, entry: str) -> Run:
  """A ``config.stack`` entry, "NAME" or "NAME:KEY=VALUE,...", as a Run."""
  where = f"--config.stack entry {entry!r}"
  name, _, spec = entry.partition(":")
  name = name.strip()
  if not _NAME.fullmatch(name):
    raise ValueError(f"{where}: the run name {name!r} must be a directory name: letters, "
                     "digits, '_', '.' and '-', not starting with '.' or '-'")
  overrides: dict[str, Any] = {}
  for item in (i.strip() for i in spec.split(",")):
    if not item:
      continue
    key, eq, text = (part.strip() for part in item.partition("="))
    if not eq:
      raise ValueError(f"{where}: expected KEY=VALUE, got {item!r}")
    if key != "seed" and not key.startswith("gates."):
      raise ValueError(
          f"{where}: {key} is shared by the runs of a stack (one program trains them all: the "
          "same model, data, optimiser and steps); a run sets only seed and gates.*. Set it "
          f"for every run with --config.{key}=...")
    if key in overrides:
      raise ValueError(f"{where}: {key} is set twice")
    leaf = key.split(".")[-1]
    node = config if key == "seed" else config.gates
    if "." in leaf or leaf not in node:
      raise ValueError(f"{where}: unknown field {key} (the gates fields: "
                       f"{', '.join('gates.' + k for k in config.gates)})")
    overrides[key] = _value(node[leaf], text, f"{where}: {key}={text!r}")
  run = Run(name, _single(config, overrides))
  try:
    config_lib.validate(run.config)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  return run


def _value(current: Any, text: str, what: str) -> Any:
  """``text`` as a value of ``current``'s type (that of the field it overrides)."""
  kind = type(current)
  try:
    if kind is bool:
      return {"true": True, "false": False}[text.lower()]
    return kind(text)
  except (KeyError, ValueError):
    raise ValueError(f"{what} is not {_TYPE.get(kind, kind.__name__)}") from None


def check_mode(config, mode: str, workdir: str) -> None:
  """A stack only trains: the analyses take one trained run's workdir."""
  if mode == "train" or not (config.get("stack") or len(config.get("seeds", ())) > 1):
    return
  runs = runs_of(config)
  if runs[0].name:
    flag = "--config.stack" if config.get("stack") else "--config.seeds"
    first = runs[0].workdir(workdir)
    raise ValueError(
        f"{flag} trains a stack of runs ({', '.join(r.workdir(workdir) for r in runs)}); run "
        f"--mode={mode} on one run: --workdir={first} without {flag}, with the run's own "
        f"config (its config.json: --config=configs/run.py:{first})")


class RunStack:
  """K runs (``runs_of``) as one program (K = 1: the plain program, no vmap)."""

  def __init__(self, runs: Sequence[Run], mesh):
    self.runs = tuple(runs)
    if not self.runs:
      raise ValueError("a run stack needs at least one run")
    self.seeds = tuple(int(r.config.seed) for r in self.runs)
    self.names = tuple(r.name for r in self.runs)
    self.stacked = len(self.runs) > 1
    self.mesh = mesh

  def __len__(self) -> int:
    return len(self.runs)

  def arg(self, values: Sequence[Any], dtype) -> jax.Array:
    """One value per run as a program argument: stacked for a stack, the value otherwise."""
    return jnp.asarray(np.stack(values) if self.stacked else values[0], dtype)

  @functools.cached_property
  def seed_arg(self) -> jax.Array:
    """The runs' seeds as a program argument."""
    return self.arg(self.seeds, jnp.uint32)

  @functools.cached_property
  def index_arg(self) -> jax.Array:
    """Each run's index in the stack as a program argument (it picks the run's gate sampler,
    ``gates.make_stack_sampler``)."""
    return self.arg(range(len(self)), jnp.int32)

  def vmap(self, fn: Callable, in_axes) -> Callable:
    """``fn`` over the runs (``in_axes`` as jax.vmap's: 0 for per-run arguments)."""
    return jax.vmap(fn, in_axes=in_axes) if self.stacked else fn

  def init(self, init: Callable[[jax.Array], Any]) -> Any:
    """``init(seed)`` of every run, as one program on the host (``sharding.on_host``: one
    compilation for all seeds), replicated over the mesh; stacked for a stack."""
    seeds = self.seed_arg
    return put_tree(on_host(lambda: self.vmap(init, 0)(seeds)), replicated(self.mesh))

  def join(self, trees: Sequence[Any]) -> Any:
    """Per-run pytrees -> one stacked pytree, replicated over the mesh."""
    if not self.stacked:
      return trees[0]
    return put_tree(jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees),
                    replicated(self.mesh))

  def split(self, tree: Any) -> list[Any]:
    """One stacked pytree -> per-run pytrees (each replicated, as a single run's)."""
    return self._split(tree) if self.stacked else [tree]

  @functools.cached_property
  def _split(self) -> Callable:  # one compiled program, reused at every checkpoint
    return jax.jit(lambda t: [jax.tree.map(lambda a: a[i], t) for i in range(len(self))],
                   out_shardings=replicated(self.mesh))

  def split_host(self, tree: Any) -> list[Any]:
    """A small stacked pytree (metrics) fetched to the host, one per run."""
    host = jax.device_get(tree)
    if not self.stacked:
      return [host]
    return [jax.tree.map(lambda a: a[i], host) for i in range(len(self))]

  def per_run(self, values: Mapping[str, Any]) -> list[dict[str, float]]:
    """``{name: value}`` (scalars, or (K,) for a stack) -> one ``{name: float}`` per run."""
    return [{k: float(v) for k, v in run.items()} for run in self.split_host(dict(values))]
