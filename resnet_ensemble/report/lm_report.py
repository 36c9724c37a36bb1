"""report.md and figures of the transformer experiments, from lesion.json and gradients.json.

Every input is optional, as for the ResNets' report: a figure is drawn for whatever results
exist, and the page lists the command of each missing one. The damage of a variant is shown as
KL(intact || variant) of its next-token distribution and as its mean next-token loss; the path
figures (E5-E7, E9) are the ResNets' (``path_figures``), over the 2L branches.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from resnet_ensemble import workdir as workdir_lib  # noqa: E402
from resnet_ensemble.report import lm_compare, path_figures, read  # noqa: E402
from resnet_ensemble.report.page import Page, pct  # noqa: E402

CONFIG = "configs/lm_bytes.py"


def command(mode: str, workdir: str) -> str:
  return (f"python -m resnet_ensemble.lm --config={CONFIG} --config.data.text=TEXT "
          f"--workdir={workdir} --mode={mode}")


def fig_single(page: Page, lesion: dict) -> None:
  """E1: KL from deleting each branch (attention and MLP side by side) and each layer."""
  single, layers = lesion["single"], lesion["single_layer"]
  kinds = np.asarray(single["kind"])
  kl = np.asarray(single["kl"])
  n_layers = len(layers["kl"])
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
  x = np.arange(n_layers)
  for offset, kind, color in ((-0.2, "attn", "C0"), (0.2, "mlp", "C1")):
    a.bar(x + offset, kl[kinds == kind], width=0.4, color=color,
          label="attention" if kind == "attn" else "MLP")
  a.set_title("E1: delete one branch")
  a.set_xlabel("layer")
  a.set_ylabel("KL(intact ‖ variant), nats per token")
  a.legend(fontsize=8)
  b.bar(x, layers["kl"], width=0.6, color="C2")
  b.set_title("E1: delete one layer (both branches)")
  b.set_xlabel("layer")
  for ax in (a, b):
    ax.set_xticks(x)
  attn, mlp = kl[kinds == "attn"], kl[kinds == "mlp"]
  worst = int(np.argmax(kl))
  base = lesion["baseline"]
  text = [f"The intact model's mean next-token loss is {base['loss']:.3f} nats and its top-1 "
          f"error {pct(base['error'])}. Deleting one branch gives a mean KL of "
          f"{attn.mean():.4f} for attention and {mlp.mean():.4f} for the MLPs; the most damaging "
          f"is {single['branch'][worst]} (KL {kl[worst]:.4f}, loss "
          f"{single['loss'][worst]:.3f}). Deleting a whole layer: KL "
          f"{min(layers['kl']):.4f}–{max(layers['kl']):.4f}."]
  page.section("E1 — deleting one branch or one layer", page.save(fig, "lm_e1_single.png"), text)


def fig_delete_k(page: Page, lesion: dict) -> None:
  """E3: loss and KL against the number of branches deleted."""
  entries = [(name, lesion[name]) for name in ("random", "random_keep_ends") if name in lesion]
  if not entries:
    return
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  text = []
  for (name, e), color in zip(entries, ("C0", "C3")):
    label = "first and last layer kept" if e["keep_ends"] else "any branch"
    k = np.asarray(e["k"])
    for ax, measure in zip(axes, ("loss", "kl")):
      mean, std = np.asarray(e[f"{measure}_mean"]), np.asarray(e[f"{measure}_std"])
      ax.plot(k, mean, "o-", ms=3, color=color, label=label)
      ax.fill_between(k, mean - std, mean + std, color=color, alpha=0.2, lw=0)
    text.append(f"{label}: deleting {k[-1]} branches gives a mean loss of "
                f"{e['loss_mean'][-1]:.3f} (KL {e['kl_mean'][-1]:.4f}) over {e['draws']} draws, "
                f"against {e['loss_mean'][0]:.3f} intact.")
  axes[0].set_ylabel("next-token loss (nats)")
  axes[1].set_ylabel("KL(intact ‖ variant)")
  for ax in axes:
    ax.set_xlabel("branches deleted")
    ax.legend(fontsize=8)
  axes[0].set_title("E3: delete k random branches")
  page.section("E3 — deleting k branches", page.save(fig, "lm_e3_delete_k.png"), [" ".join(text)])


def fig_reorder(page: Page, lesion: dict) -> list[str]:
  """E4: KL against Kendall's tau (random swaps, adjacent swaps); the painters table."""
  reorder, adjacent = lesion.get("reorder"), lesion.get("adjacent_swaps")
  if reorder is None and adjacent is None:
    return []
  fig, ax = plt.subplots(figsize=(6.5, 4))
  text = []
  if reorder is not None:
    tau, kl = np.ravel(reorder["tau"]), np.ravel(reorder["kl"])
    ax.scatter(tau, kl, s=10, color="C0", alpha=0.6, label="k random swaps")
    text.append(f"{len(tau)} random reorders (1–{reorder['k'][-1]} swaps, Kendall's tau "
                f"{tau.min():.2f}–{tau.max():.2f}): mean KL {kl.mean():.4f}.")
  if adjacent is not None and adjacent["kl"]:
    ax.scatter(adjacent["tau"], adjacent["kl"], s=25, marker="s", color="C3",
               label="adjacent swaps")
    worst = int(np.argmax(adjacent["kl"]))
    text.append(f"Swapping adjacent layers costs a KL of {min(adjacent['kl']):.4f}–"
                f"{max(adjacent['kl']):.4f}; the worst is layers "
                f"{adjacent['pairs'][worst][0]} and {adjacent['pairs'][worst][1]}.")
  ax.set_xlabel("Kendall's tau against the trained order")
  ax.set_ylabel("KL(intact ‖ variant)")
  ax.set_title("E4: reordering layers")
  ax.invert_xaxis()
  ax.legend(fontsize=8)
  page.section("E4 — reordering layers", page.save(fig, "lm_e4_reorder.png"), text)
  painters = lesion.get("painters")
  if not painters:
    return []
  rows = ["| intervention | layers run | Kendall's tau | loss | top-1 error | KL |",
          "|---|---|---|---|---|---|"]
  for r in painters["rows"]:
    tau = "—" if r["tau"] is None else f"{r['tau']:.2f}"
    rows.append(f"| {r['name']} | {' '.join(map(str, r['order']))} | {tau} | {r['loss']:.3f} | "
                f"{pct(r['error'])} | {max(r['kl'], 0.0):.4f} |")  # KL >= 0: -1e-8 is rounding
  lo, hi = painters["span"]
  return ["## E4 — painters interventions", "",
          f"The middle layers {lo}–{hi - 1} repeated, reversed, shuffled or skipped (one "
          f"compiled program: every variant padded to L + 1 positions).", "", *rows, ""]


def fig_training(page: Page, history: list[dict], final: dict, config: dict,
                 corpus: dict) -> None:
  """The training of a model trained here: training and held-out loss per step (bits per
  token: bits per byte for bytes), and what it was trained on."""
  train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
  held = [(r["step"], r["held_out_loss"]) for r in history if "held_out_loss" in r]
  if not held:
    return
  bits = 1 / np.log(2)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  if train:
    ax.plot(*np.asarray(train).T * [[1], [bits]], lw=1, color="C0", label="training (mean of "
            "the steps since the last row)")
  ax.plot(*np.asarray(held).T * [[1], [bits]], "o-", ms=3, color="C1", label="held-out text")
  ax.set_xlabel("step")
  ax.set_ylabel("next-token loss, bits per token")
  ax.set_title("Training")
  ax.legend(fontsize=8)
  tc = config.get("train", {})
  best_step, best = min(held, key=lambda r: r[1])
  text = [f"Trained here for {final['step']} steps of {tc.get('batch_size')} windows of "
          f"{config.get('data', {}).get('window')} tokens ({final['tokens_seen']:,} tokens"]
  if corpus.get("train_bytes"):
    text[0] += (f", {final['tokens_seen'] / corpus['train_bytes']:.1f} passes over the "
                f"{corpus['train_bytes']:,} training bytes of {corpus['source']}; "
                f"{corpus['licence']}; {corpus['split']}")
  text[0] += (f"). Held-out loss at the end: {final['held_out_loss'] * bits:.3f} bits per token "
              f"({final['held_out_loss']:.3f} nats), top-1 error {pct(final['held_out_error'])}.")
  if best_step != final["step"]:
    text.append(f"The held-out loss was lowest at step {best_step} ({best * bits:.3f} bits per "
                "token): the last steps fit the training text more than the held-out one.")
  page.section("Training", page.save(fig, "lm_training.png"), text)


def write_report(workdir: str, out_dir: str | None = None,
                 resnet_workdir: str | None = None) -> list[str]:
  """Reads lesion.json and gradients.json in ``workdir`` (and, for a model trained there,
  metrics.jsonl and final_metrics.json); writes the figures and report.md into ``out_dir``
  (default: workdir). ``resnet_workdir``: a ResNet's results set beside the transformer's
  (default: the config's ``report.resnet``). Returns the files written, report.md last."""
  out_dir = out_dir or workdir
  workdir_lib.path(out_dir).mkdir(parents=True, exist_ok=True)
  lesion = read.load(workdir, "lesion.json")
  paths = read.load(workdir, workdir_lib.gradients_file(workdir))
  final = read.load(workdir, "final_metrics.json")
  page = Page(out_dir)
  painters: list[str] = []
  config = ((lesion or paths or {}).get("config") or read.load(workdir, "config.json") or {})
  if final:
    fig_training(page, read.history(workdir), final, config,
                 (lesion or paths or {}).get("corpus") or {})
  if lesion:
    fig_single(page, lesion)
    fig_delete_k(page, lesion)
    painters = fig_reorder(page, lesion)
  source = lesion or paths
  n = (source or {}).get("layout", {}).get("n_branches")
  if n:
    path_figures.fig_path_lengths(page, n, "2L branches: attention and MLP", unit="branches")
    path_figures.fig_gradient(page, paths)
    eff = path_figures.effective(n, paths)
    path_figures.fig_total_gradient(page, n, eff, layers="")
    path_figures.fig_deletion_paths(page, n, eff, unit="branches")
  lines = ["# Residual transformers behave like ensembles?", ""]
  if source:
    lines += [f"Model: {source['model_source']} ({source['layout']['n_layers']} layers, "
              f"{n} branches); tokens: {source['tokenizer']}; {source['windows']} windows of "
              f"{source['window']} tokens ({source['tokens_predicted']} predicted).", ""]
  if paths:
    lines += [f"E6 routes the gradient of the next-token loss at the {paths['gradient_at']}.", ""]
  missing = ([f"- E1–E4: `{command('lesion', workdir)}`"] if not lesion else []) + (
      [f"- E5–E7, E9: `{command('gradients', workdir)}`"] if not paths else [])
  if missing:
    lines += ["## Missing experiments", "", *missing, ""]
  for title, image, text in page.sections:
    lines += [f"## {title}", ""]
    if image:
      lines += [f"![{title}]({image})", ""]
    lines += [*[t for t in text if t], ""]
    if title.startswith("E4") and painters:
      lines += painters
  resnet = resnet_workdir or config.get("report", {}).get("resnet") or None
  lines += lm_compare.section(lesion, paths, resnet)
  text = "\n".join(lines).rstrip() + "\n"
  return page.files + [workdir_lib.write_text(out_dir, "report.md", text)]
