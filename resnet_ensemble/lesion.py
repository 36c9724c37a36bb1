"""Lesion studies (E1–E4): which damaged networks each experiment draws, and the study that
evaluates them (``lesion_engine``) and writes ``lesion.json``, resumably.

A *variant* of the trained network is a block order (a permutation of the stacked same-shape
blocks, E4) plus a gate vector over positions (zeros delete blocks, E1–E3).
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from resnet_ensemble import restore, workdir as workdir_lib
from resnet_ensemble.layout import BlockLayout
from resnet_ensemble.lesion_engine import make_engine
from resnet_ensemble.progress import say
from resnet_ensemble.sharding import make_mesh


# ---------------------------------------------------------------- variants (host side, numpy)

def single_deletion_gates(layout: BlockLayout) -> np.ndarray:
  """E1: row i deletes block i only."""
  return 1.0 - np.eye(layout.n_blocks, dtype=np.float32)


def eligible_blocks(layout: BlockLayout, exclude_downsampling: bool) -> np.ndarray:
  blocks = np.arange(layout.n_blocks)
  if exclude_downsampling:
    blocks = np.setdiff1d(blocks, layout.downsampling)
  return blocks


def random_deletion_gates(rng: np.random.Generator, layout: BlockLayout, k: int, draws: int,
                          exclude_downsampling: bool = False) -> np.ndarray:
  """E3: ``draws`` gate vectors, each deleting k distinct blocks chosen uniformly."""
  return random_deletions(rng, layout.n_blocks, eligible_blocks(layout, exclude_downsampling),
                          k, draws, "blocks",
                          "downsampling excluded" if exclude_downsampling else "all blocks")


def random_deletions(rng: np.random.Generator, n: int, eligible: np.ndarray, k: int,
                     draws: int, unit: str = "blocks", scope: str = "all") -> np.ndarray:
  """``draws`` gate vectors over n positions, each 0 at k distinct positions drawn uniformly
  from ``eligible`` (``unit`` and ``scope`` name them in the error when k does not fit)."""
  if not 0 <= k <= len(eligible):
    raise ValueError(f"cannot delete k={k} {unit}: there are {len(eligible)} eligible {unit} "
                     f"({scope})")
  gates = np.ones((draws, n), np.float32)
  for row in gates:
    row[rng.choice(eligible, size=k, replace=False)] = 0.0
  return gates


def random_swap_orders(rng: np.random.Generator, layout: BlockLayout, k: int,
                       draws: int) -> np.ndarray:
  """E4: ``draws`` block orders, each made by k random swaps of two same-shape blocks.

  A swap picks a block uniformly among the stacked (non-downsampling) blocks, then a partner
  uniformly among the other stacked blocks of its stage."""
  groups = [list(layout.stacked_range(s)) for s in range(layout.num_stages)
            if len(layout.stacked_range(s)) >= 2]
  if k and not groups:
    raise ValueError("no stage has two same-shape blocks to swap")
  movable = [i for g in groups for i in g]
  stage_of = {i: g for g in groups for i in g}
  orders = np.tile(np.arange(layout.n_blocks), (draws, 1))
  for order in orders:
    for _ in range(k):
      i = rng.choice(movable)
      j = rng.choice([b for b in stage_of[i] if b != i])
      order[i], order[j] = order[j], order[i]
  return orders


def swapped_pairs(orders: np.ndarray) -> list[list[int]]:
  """The two block positions each single-swap order exchanged, e.g. [[37, 52], ...]."""
  pairs = [np.flatnonzero(np.asarray(o) != np.arange(len(o))).tolist() for o in orders]
  if any(len(p) != 2 for p in pairs):
    raise ValueError("swapped_pairs takes orders that differ from the identity by one swap")
  return pairs


def kendall_tau(order: Sequence[int]) -> float:
  """Kendall's tau between ``order`` and the identity order (exact: pairs counted, no ties)."""
  order = np.asarray(order)
  n = len(order)
  if n < 2:
    return 1.0
  discordant = int(np.sum(np.triu(order[:, None] > order[None, :], k=1)))
  pairs = n * (n - 1) // 2
  return (pairs - 2 * discordant) / pairs


# ------------------------------------------------------------------------------ the study

def _stats(errors: np.ndarray) -> dict:
  return {"mean": errors.mean(1).tolist(), "std": errors.std(1).tolist(),
          "min": errors.min(1).tolist(), "max": errors.max(1).tolist(),
          "error": errors.tolist()}


PARTIAL = "lesion.partial.json"
RESUMABLE = ("random", "random_no_downsampling", "reorder")
EXECUTION_ONLY = ("chunk", "variant_weights")  # lesion settings that leave the numbers alone


def _study_identity(out: dict) -> dict:
  """What decides a study's numbers: the network, its gates, the data, the draws (not
  execution settings such as ``lesion.chunk`` or where the checkpoints are kept)."""
  c = out["config"]
  return json.loads(json.dumps({
      "model": c["model"], "gates": c.get("gates"), "seed": c["seed"],
      "data": c["data"].get("name"), "max_images": c.get("eval", {}).get("max_images"),
      "lesion": {k: v for k, v in c["lesion"].items() if k not in EXECUTION_ONLY},
      **{k: out[k] for k in ("checkpoint_step", "data_source", "test_images")}}))


def _finished_experiments(workdir: str, out: dict) -> dict:
  """E3/E4 results of an earlier run of this same study (``lesion.json`` or a cut
  ``lesion.partial.json``): same network, checkpoint step, data and draws."""
  now = _study_identity(out)
  done = {}
  for name in ("lesion.json", PARTIAL):
    earlier = workdir_lib.read_json(workdir, name) or {}
    try:
      same = _study_identity(earlier) == now
    except (KeyError, AttributeError, TypeError):  # not a study, or an older format
      same = False
    if same:
      done.update({k: earlier[k] for k in RESUMABLE if k in earlier and k not in done})
  return done


def run_study(config, workdir: str, allow_unfinished: bool = False) -> dict:
  """E1–E4 on the newest checkpoint of ``workdir``; writes and returns ``lesion.json``.

  After each experiment the results so far go to ``lesion.partial.json``, so a study cut
  short (a preempted VM, a time limit) keeps what it finished without replacing an earlier
  complete ``lesion.json``; the finished study replaces both. A rerun resumes: E3 and E4
  results already in either file for the same config, checkpoint and test images are kept
  (their draws are still made, so later experiments see the same random stream)."""
  return study(config, workdir, restore.load_trained(config, workdir, allow_unfinished))


def study(config, workdir: str, t: restore.Trained) -> dict:
  """``run_study`` on a network restored already, evaluated on its ``t.dataset``: a job that
  analyses a run several ways (``--mode=all``) restores it once."""
  layout, lc = t.layout, config.lesion
  n = layout.n_blocks
  if lc.max_k > n:
    raise ValueError(f"lesion.max_k={lc.max_k} is larger than the number of blocks ({n})")
  engine = make_engine(config, t, make_mesh())
  rng = np.random.default_rng(config.seed)
  # The intact network rides in E1's first chunk (a chunk of its own would cost as much).
  first = engine.evaluate(np.concatenate([np.ones((1, n), np.float32),
                                          single_deletion_gates(layout)]),
                          desc="baseline and E1 (delete one block)")
  baseline, single = float(first[0]), first[1:]
  out = {
      "config": workdir_lib.config_dict(config), **t.describe(),
      "data_source": t.dataset.source, "test_images": engine.images, "seed": config.seed,
      "layout": layout.describe(),
      "model_kind": "plain" if config.model.name == "plain" else "resnet",
      "baseline": {"error": baseline, "accuracy": 1.0 - baseline},
      "single": {"error": single.tolist()},
  }
  done = _finished_experiments(workdir, out)
  workdir_lib.write_json(workdir, PARTIAL, {**out, **done})
  variants = [("random", False)]
  if lc.exclude_downsampling_variant and layout.downsampling:
    variants.append(("random_no_downsampling", True))
  for name, exclude in variants:
    ks = list(range(min(lc.max_k, len(eligible_blocks(layout, exclude))) + 1))
    gates = np.concatenate([random_deletion_gates(rng, layout, k, lc.draws, exclude) for k in ks])
    if name in done and done[name]["k"] == ks and done[name]["draws"] == lc.draws:
      out[name] = done[name]
      say(f"E3 ({name}): kept from an earlier run")
      continue
    errors = engine.evaluate(gates, desc=f"E3 delete k blocks ({name})").reshape(len(ks), lc.draws)
    out[name] = {"k": ks, "draws": lc.draws, "exclude_downsampling": exclude, **_stats(errors)}
    workdir_lib.write_json(workdir, PARTIAL, out)
  swappable = any(len(layout.stacked_range(s)) >= 2 for s in range(layout.num_stages))
  if lc.reorder_max_swaps and not swappable:
    say("E4 skipped: no stage has two same-shape blocks to swap")
  if lc.reorder_max_swaps and swappable:
    ks = list(range(1, lc.reorder_max_swaps + 1))
    orders = np.concatenate([random_swap_orders(rng, layout, k, lc.reorder_draws) for k in ks])
    prior = done.get("reorder")
    if prior and prior["k"] == ks and prior["draws"] == lc.reorder_draws:
      out["reorder"] = prior
      say("E4: kept from an earlier run")
    else:
      errors = engine.evaluate(orders=orders, desc="E4 reorder blocks").reshape(len(ks), -1)
      taus = np.asarray([kendall_tau(o) for o in orders]).reshape(len(ks), -1)
      out["reorder"] = {"k": ks, "draws": lc.reorder_draws, "tau": taus.tolist(),
                        "error": errors.tolist(),
                        # k = 1: which two blocks each draw swapped (where order matters)
                        "single_swaps": swapped_pairs(orders[:lc.reorder_draws])}
  workdir_lib.write_json(workdir, "lesion.json", out)
  if workdir_lib.is_main_process():
    workdir_lib.path(workdir, PARTIAL).unlink(missing_ok=True)
  return out
