"""The text of report.md: what was run, the "ours vs paper" table, the figures' sections, and
each missing experiment with the command that produces it.

Every number is computed from the result files (read.Runs) or by the figure modules, never
written by hand; a half-finished run still gives a readable report whose "Missing
experiments" commands can be pasted as they are.
"""

from __future__ import annotations

import re
import shlex
from typing import Sequence

import numpy as np

from resnet_ensemble import data, path_counts
from resnet_ensemble.report import paper, read
from resnet_ensemble.report.page import pct
from resnet_ensemble.report.path_figures import fit_text

# Config files named in the "missing" commands when write_report is not told the run's own
# (config_file), and for the comparison runs; adjust here if the configs are renamed.
CONFIGS = {
  "resnet": "configs/cifar10_resnet110.py",
  "imagenet": "configs/imagenet_resnet200.py",
  "vgg": "configs/cifar10_vgg15.py",
  "sd": "configs/cifar10_resnet110_sd.py",
  "effective": "configs/cifar10_resnet110_effective.py",
}
RUN_CONFIG = "configs/run.py"  # a run's own settings, read from its config.json
DEFAULT_WORKDIRS = {"vgg": "runs/vgg15", "sd": "runs/resnet110_sd",
                    "effective": "runs/resnet110_effective"}

Rows = list[tuple[str, str, str]]            # (quantity, ours, paper)
Missing = list[tuple[str, list[str]]]        # (what is missing, commands that produce it)


def command(config: str, workdir: str, mode: str | None = None,
            flags: Sequence[str] = ()) -> str:
  """A command line to paste: each word shell-quoted, so a path with a space stays one word."""
  argv = ["python", "-m", "resnet_ensemble", f"--config={config}", f"--workdir={workdir}"]
  return " ".join(map(_quote, argv + ([f"--mode={mode}"] if mode else []) + list(flags)))


def _quote(word: str) -> str:
  """One shell word, quoted, except ``$RESNET_ENSEMBLE_DATA``, which the shell is to expand."""
  head, var, tail = word.partition(data.DATA_DIR)
  return "".join([shlex.quote(head) if head else "", var, shlex.quote(tail) if tail else ""])


def in_data_folder(path: str) -> str:
  """A stored weights path as a command names it: a file under a ``pretrained/`` folder as
  ``$RESNET_ENSEMBLE_DATA/pretrained/...`` (the data folder's layout, README "Data"), since
  the folder it was read from is the measuring machine's; any other path as it is."""
  parts = path.split("/")
  if "pretrained" in parts[:-1]:
    return "/".join([data.DATA_DIR] + parts[parts.index("pretrained"):])
  return path


def without_folders(text: str) -> str:
  """``text`` with each path cut to its last part (older results stored the folder their data
  was read from, which names the measuring machine's folders, not the data)."""
  return re.sub(r"[^\s,;()=]*/([^\s,;()=/]+)/?", r"\1", text)


def _blocks_1based(indices: Sequence[int]) -> str:
  return ", ".join(str(i + 1) for i in indices)


def _lesion_line(res: dict, what: str) -> str:
  n, down = read.layout(res)
  cfg = read.config(res)
  unit = "deletable layers" if read.is_plain(res) else "blocks"
  return (f"- {what}: {read.model_label(res)} ({res.get('model_kind', 'n/a')}, {n} {unit}, "
          f"stages {(res.get('layout') or {}).get('stage_sizes', 'n/a')}, downsampling blocks "
          f"{_blocks_1based(down) or 'none'}), data {cfg.get('data', {}).get('name', 'n/a')} "
          f"({without_folders(res.get('data_source', 'n/a'))}), "
          f"seed {res.get('seed', cfg.get('seed', 'n/a'))}, "
          f"checkpoint step {res.get('checkpoint_step', 'n/a')}; undamaged test error "
          f"{pct((res.get('baseline') or {}).get('error', float('nan')))}.")


def run_lines(runs: read.Runs) -> list[str]:
  """What was run, from the result files' own metadata."""
  lines = []
  final, pj, eff_final = runs.final, runs.paths, runs.effective_final
  if final:
    lines.append(f"- Training ({runs.workdir}): step {final.get('step', 'n/a')}, test error "
                 f"{pct(final.get('eval_error', float('nan')))}, test loss "
                 f"{final.get('eval_loss', float('nan')):.4f}.")
  if runs.lesion:
    lines.append(_lesion_line(runs.lesion, "Lesion study (E1, E3, E4)"))
  if pj:
    g = pj.get("gradient") or {}
    dtype = read.config(pj).get("model", {}).get("dtype")
    lines.append(f"- Gradient per path length (E6, E7): n = {pj.get('n')}, checkpoint step "
                 f"{pj.get('checkpoint_step', 'n/a')}, {g.get('samples_per_k', 'n/a')} samples "
                 f"per k, batch {g.get('batch_size', 'n/a')}"
                 + (f", {dtype}" if dtype else "")
                 + (f", paths drawn as {pj['sampler']}" if pj.get("sampler") else "") + ".")
  if runs.vgg:
    lines.append(_lesion_line(runs.vgg, "Plain network (E1 comparison)"))
  if runs.sd:
    lines.append(_lesion_line(runs.sd, "Stochastic depth (E10)"))
  if eff_final:
    lines.append(f"- Effective-path training (E8): step {eff_final.get('step', 'n/a')}, test "
                 f"error {pct(eff_final.get('eval_error', float('nan')))}.")
  return lines or ["- No results found."]


def seed_cell(runs: read.Runs) -> str:
  """The main run's test error over its seeds: mean ± standard deviation (n - 1), each run."""
  done = [(runs.workdir, runs.final)] + [(wd, f) for wd, f in runs.seeds
                                          if f and "eval_error" in f]
  errors = np.asarray([f["eval_error"] for _, f in done], np.float64)
  each = ", ".join(f"seed {read.seed_of(wd)} {pct(e)}" for (wd, _), e in zip(done, errors))
  return (f"{pct(errors.mean())} ± {pct(errors.std(ddof=1))} over {len(done)} seeds "
          f"({each})")


def scale_note(runs: read.Runs) -> list[str]:
  """Where the main run is smaller than the paper's (another data set, depth or length of
  training), a first paragraph that says so and names the command for the paper's scale."""
  cfg = read.config(runs.lesion) or read.config(runs.paths)
  if not cfg or cfg.get("weights"):
    return []
  model, data, steps = cfg.get("model", {}), cfg.get("data", {}), cfg.get("train", {})
  label = read.model_label(runs.lesion) if runs.lesion else f"depth {model.get('depth')}"
  num_steps = steps.get("num_steps")
  if (data.get("name") == "cifar10" and label == "ResNet-110"
      and (num_steps or 0) >= 64_000) or data.get("name") == "imagenet2012":
    return []
  return [f"**Small-scale numbers**: {label} (width {model.get('width') or 'standard'}) on "
          f"{data.get('name')}, {num_steps} training steps. They show every experiment at "
          "work, not the paper's values; the paper's scale (ResNet-110 on CIFAR-10, 64k "
          "steps, every run and analysis) is `launch/reproduce_cifar10.sh` (launch/README.md).",
          ""]


def unfinished_banner(runs: read.Runs) -> list[str]:
  """The report's first line when any analysis ran on an unfinished run
  (``--allow_unfinished``): its numbers are not the trained network's."""
  studies = [(runs.workdir, runs.lesion), (runs.workdir, runs.paths),
             (runs.vgg_workdir, runs.vgg), (runs.sd_workdir, runs.sd)]
  notes = sorted({f"{wd} at step {r['checkpoint_step']} of {r['num_steps']}"
                  for wd, r in studies if r and r.get("finished") is False})
  if not notes:
    return []
  return [f"> **UNFINISHED RUN: analysed before the end of training** ({'; '.join(notes)}; "
          "--allow_unfinished). These numbers are not those of the trained network.", ""]


def is_imagenet(runs: read.Runs) -> bool:
  """ImageNet runs compare with Fig. 4 and have no CIFAR-only comparisons (VGG, E8, E10)."""
  return read.data_name(runs.lesion or runs.paths) == "imagenet2012"


def _error_rows(runs: read.Runs) -> Rows:
  """The trained network's error (its seeds' spread) and the effective-path run's (E8)."""
  final, lesion, eff_final = runs.final, runs.lesion, runs.effective_final
  rows = []
  model = f"{read.model_label(lesion)}, " if lesion else ""
  if final and final.get("eval_error") is not None:
    ours = f"{pct(final['eval_error'])} ({model}step {final.get('step', 'n/a')})"
  elif lesion and (lesion.get("baseline") or {}).get("error") is not None:
    ours = f"{pct(lesion['baseline']['error'])} ({model}lesion baseline)"
  else:
    ours = "missing"
  if is_imagenet(runs):
    rows.append(("ImageNet top-1 validation error", ours, "— (Fig. 4: ResNet-200)"))
  else:
    label = read.model_label(lesion, "ResNet-110") if lesion else "ResNet-110"
    title = ("ResNet-110 test error" if label == "ResNet-110"
             else f"test error ({label}; the paper's is ResNet-110's)")
    rows.append((title, ours, paper.RESNET_ERROR))
  if final and final.get("eval_error") is not None and any(f for _, f in runs.seeds):
    rows.append(("test error over seeds", seed_cell(runs), "—"))
  if runs.effective_workdir is not None:
    e = (eff_final or {}).get("eval_error")
    extra = [f"{key} {pct(v)}" for key, v in sorted((eff_final or {}).items())
             if "error" in key and key != "eval_error" and isinstance(v, (int, float))]
    gates = (read.run_config(runs.effective_workdir).get("gates") or {})
    n = read.layout(lesion)[0] if lesion else paper.N
    k = gates.get("k", 23)
    full = (f"; the full network: {seed_cell(runs)}" if e is not None and final
            and final.get("eval_error") is not None and any(f for _, f in runs.seeds) else "")
    rows.append((f"effective-path ({k} of {n}) training test error"
                 + ("" if n == paper.N else " (the paper's 23 of 54)"),
                 (pct(e) + (f" ({'; '.join(extra)})" if extra else "") + full)
                 if e is not None else "missing", paper.EFFECTIVE_ERROR))
  return rows


def table_rows(runs: read.Runs, *, n: int, delete_k: list[dict] | None,
               e5: tuple[int, int, float], fit: dict | None,
               eff: tuple | None) -> Rows:
  """The "ours vs paper" rows. ``delete_k``, ``e5``, ``fit``, ``eff``: what the figures
  computed (lesion_figures.fig_delete_k, path_figures.fig_path_lengths, .fig_gradient,
  .effective), so the table quotes the figures' own numbers."""
  rows = _error_rows(runs)
  k = paper.delete_k(n)
  e3 = (f"error after deleting {k} random blocks"
        + ("" if n == paper.N else f" ({k} of {n}: the paper's {paper.DELETE_K} of {paper.N})"))
  if delete_k is not None:
    cells = []
    for v in delete_k:
      s, i = v["stats"], v["i10"]
      kk = int(s["k"][i])
      cells.append(f"{pct(s['mean'][i])} ± {pct(s['std'][i])} ({v['label']}"
                   + (f"; k = {kk}: largest k ≤ {k} run" if kk != k else "") + ")")
    rows.append((e3, "; ".join(cells), paper.DELETE_10))
  else:
    rows.append((e3, "missing", paper.DELETE_10))
  lo, hi, share = e5
  rows.append(("share of paths of length 19–35", f"{pct(share)} (lengths {lo}–{hi}, n = {n})",
               paper.PATH_SHARE))
  if fit is not None:
    rows.append(("gradient per path length (E6)",
                 f"{'exponential decay' if fit['factor'] < 1 else 'no decay'}, "
                 f"{fit_text(fit)}; log-linear fit over lengths "
                 f"{fit['first']}–{fit['last']} ({fit['lengths']} lengths), "
                 f"{runs.paths['gradient'].get('samples_per_k', 'n/a')} sampled paths per "
                 "length", paper.DECAY))
  else:
    rows.append(("gradient per path length (E6)", "missing", paper.DECAY))
  if eff is not None:
    rows.append(("effective path lengths",
                 f"{eff[1]}–{eff[2]} ({path_counts.E7_MASS * 100:.0f} % of total gradient)",
                 paper.EFFECTIVE_LENGTHS))
    rows.append(("share of paths that are effective", pct(eff[3]), paper.EFFECTIVE_SHARE))
  else:
    rows.append(("effective path lengths", "missing", paper.EFFECTIVE_LENGTHS))
    rows.append(("share of paths that are effective", "missing", paper.EFFECTIVE_SHARE))
  jpeg, vgg = runs.jpeg, runs.vgg
  if jpeg is not None:
    rows.append((f"test-time JPEG gap ({jpeg['images']} test images, original vs JPEG pixels)",
                 f"{pct(jpeg['error_exact'])} vs {pct(jpeg['error_jpeg'])} "
                 f"({jpeg['gap_points']:+.2f} points)", "— (original pixels only)"))
  if vgg is not None and (vgg.get("single") or {}).get("error"):
    v = np.asarray(vgg["single"]["error"], dtype=np.float64)
    rows.append(("VGG, any single layer deleted",
                 f"{pct(v.min())} – {pct(v.max())} (min – max over {v.size} layers; chance "
                 f"{pct(read.chance_error(vgg))})", paper.VGG))
  return rows


def _main_command(runs: read.Runs, config_file: str | None) -> tuple[str, list[str]]:
  """The config and flags that rerun the main run: the settings its workdir's config.json
  holds (``configs/run.py:WORKDIR``: every override it was started with, its train.num_steps
  too), else its own config file if known; imported pretrained weights repeat their flags
  (there is nothing to train)."""
  main_cfg = config_file or CONFIGS["imagenet" if is_imagenet(runs) else "resnet"]
  cfg = read.config(runs.lesion) or read.config(runs.paths)
  if cfg.get("weights"):
    return (config_file or "configs/imagenet_pretrained.py",
            [f"--config.weights={in_data_folder(cfg['weights'])}",
             f"--config.arch={cfg.get('arch')}"])
  if read.load(runs.workdir, "config.json") is not None:
    return f"{RUN_CONFIG}:{runs.workdir}", []
  return main_cfg, []


def missing_experiments(runs: read.Runs, *, n_from: str,
                        config_file: str | None = None) -> Missing:
  """Each experiment without results and the commands that produce it, in the order to run
  them: training, the analyses of the main run, its other seeds, the comparison runs."""
  missing: Missing = []
  workdir, lesion, pj = runs.workdir, runs.lesion, runs.paths

  def miss(what: str, *commands: str) -> None:
    missing.append((what, list(commands)))

  main_cfg, main_flags = _main_command(runs, config_file)
  imported = bool(main_flags)
  if runs.final is None and not imported:
    miss(f"training results (final_metrics.json in {workdir})",
         command(main_cfg, workdir, flags=main_flags))
  if lesion is None:
    miss("E1, E3, E4 (lesion.json: single-block deletion, k random deletions, reordering)",
         command(main_cfg, workdir, "lesion", main_flags))
  else:
    for key, what in (("single", "E1"), ("random", "E3"),
                      ("random_no_downsampling", "E3 variant without downsampling blocks"),
                      ("reorder", "E4")):
      entry = lesion.get(key)
      if not entry or (key.startswith("random") and len(entry.get("k", ())) < 2):
        miss(f"{what} (lesion.json has no '{key}'" + (" with k > 0)" if entry else ")"),
             command(main_cfg, workdir, "lesion", main_flags))
  if pj is None or not pj.get("gradient"):
    miss("E6, E7 (gradients.json: gradient per path length, effective paths)",
         command(main_cfg, workdir, "gradients", main_flags))
  for wd, f in runs.seeds:
    if f is None:
      seed = re.search(r"seed(\d+)/*$", wd)
      miss(f"another seed's training results (final_metrics.json in {wd})",
           command(main_cfg, wd, flags=main_flags
                   + ([f"--config.seed={seed.group(1)}"] if seed else [])))
  if n_from.startswith("no run data"):
    miss("E5, E9 use the paper's n = 54 (no lesion.json or gradients.json gives our n)")
  if is_imagenet(runs):  # Fig. 3's VGG panel, E8 and E10 are CIFAR experiments
    return missing
  for key, wd, res, what, fname in (
      ("vgg", runs.vgg_workdir, runs.vgg, "VGG-15 comparison for E1 / Fig. 3", "lesion.json"),
      ("sd", runs.sd_workdir, runs.sd, "E10 / Fig. 8 (stochastic depth)", "lesion.json"),
      ("effective", runs.effective_workdir, runs.effective_final,
       "E8 (effective-path training)", "final_metrics.json")):
    if res is not None:
      continue
    d = wd or DEFAULT_WORKDIRS[key]
    cmds = [command(CONFIGS[key], d)] + ([command(CONFIGS[key], d, "lesion")]
                                         if key != "effective" else [])
    arg = {"vgg": "vgg_workdir", "sd": "sd_workdir", "effective": "effective_workdir"}[key]
    note = f"{fname} in {wd}" if wd else f"not given: pass {arg}="
    miss(f"{what} ({note})", *cmds)
  return missing


def render(runs: read.Runs, rows: Rows, sections: list[tuple[str, str | None, list[str]]],
           missing: Missing) -> str:
  """report.md: the unfinished-run banner if any, what was run, the table, one section per
  figure, and the missing experiments."""
  md = unfinished_banner(runs)
  md += ["# Residual networks behave like ensembles of relatively shallow networks — "
         "reproduction report", "",
         "Veit, Wilber, Belongie (NeurIPS 2016). Errors are test-set error rates.", ""]
  md += scale_note(runs)
  md += ["## What was run", ""]
  md += run_lines(runs)
  md += ["", "## Ours vs paper", "", "| quantity | ours | paper |", "| --- | --- | --- |"]
  md += [f"| {q} | {o} | {p} |" for q, o, p in rows]
  md += [""]
  for title, image, text in sections:
    md += [f"## {title}", ""]
    if image:
      md += [f"![{title}]({image})", ""]
    for paragraph in text:
      md += [paragraph, ""]
  md += ["## Missing experiments", ""]
  if not missing:
    md += ["None: every experiment has results.", ""]
  for what, cmds in missing:
    md.append(f"- {what}" + (":" if cmds else ""))
    md += [f"  - `{c}`" for c in cmds]
  md.append("")
  return "\n".join(md)
