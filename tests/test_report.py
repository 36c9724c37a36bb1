"""report.write_report: figures and report.md from synthetic results of a 6-block network.

The numbers the report states are checked against values worked out by hand for these small
fixtures (a 6-block network, gradient norms halving per block), so a figure module that
computes them wrongly fails here; one test is a smoke test of report.md's layout."""

import json
import os
import shlex

import numpy as np
import pytest

from resnet_ensemble import path_counts, report, workdir as workdir_lib
from resnet_ensemble.report import lesion_figures, path_figures, read

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 6
DOWN = [2, 4]
ALL_FIGS = ["fig3_single_block_deletion.png", "fig5a_delete_k_blocks.png", "fig5b_reorder.png",
            "fig5c_single_swaps.png",
            "fig6a_path_lengths.png", "fig6b_gradient_per_length.png",
            "fig6c_total_gradient.png", "fig7_deletion_removes_long_paths.png",
            "fig8_stochastic_depth.png"]


def _write(directory, name, obj):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, name), "w") as f:
    json.dump(obj, f)


def _random(rng, exclude, base=0.06):
  ks = list(range(0, N + 1))
  errs = [(base + 0.1 * k + 0.02 * rng.standard_normal(20)).clip(0, 0.9).tolist() for k in ks]
  return {"k": ks, "draws": 20, "exclude_downsampling": exclude, "error": errs,
          "mean": [float(np.mean(e)) for e in errs], "std": [float(np.std(e)) for e in errs],
          "min": [float(np.min(e)) for e in errs], "max": [float(np.max(e)) for e in errs]}


def _lesion(rng, kind="resnet", baseline=0.0612, single=None, data="cifar10"):
  """A plausible lesion.json: downsampling blocks hurt, the others barely matter."""
  down = DOWN if kind == "resnet" else []
  if single is None:
    single = [0.30 if i in down else baseline + 0.002 * i for i in range(N)]
  out = {"config": {"seed": 0, "model": {"name": "cifar_resnet" if kind == "resnet" else "plain",
                                         "depth": 2 * N + 2},
                    "data": {"name": data}},
         "checkpoint_step": 640, "data_source": "synthetic test data", "seed": 0,
         "layout": {"n_blocks": N, "stage_sizes": [2, 2, 2] if kind == "resnet" else [N],
                    "downsampling": down,
                    "stages": [[0, 1], [2, 3], [4, 5]] if kind == "resnet" else [list(range(N))]},
         "model_kind": kind,
         "baseline": {"error": baseline, "accuracy": 1 - baseline, "loss": 0.3},
         "single": {"error": single}}
  if kind == "resnet":
    out["random"] = _random(rng, False)
    out["random_no_downsampling"] = _random(rng, True)
    ks = [1, 2, 3]
    out["reorder"] = {"k": ks, "draws": 10,
                      "tau": [(1 - 0.15 * k + 0.03 * rng.standard_normal(10)).tolist()
                              for k in ks],
                      "error": [(baseline + 0.05 * k + 0.01 * rng.standard_normal(10)).tolist()
                                for k in ks],
                      "single_swaps": [[0, 1], [2, 3], [4, 5]] * 3 + [[1, 0]]}
  return out


def _paths_json():
  k = np.arange(N + 1)
  mean = 2.0 * 0.5**k
  return {"n": N, "checkpoint_step": 640, "config": {},
          "gradient": {"k": k.tolist(), "samples_per_k": 50, "batch_size": 16,
                       "mean_norm": mean.tolist(), "std_norm": (0.3 * mean).tolist(),
                       "mean_norm_image": (0.1 * mean).tolist(),
                       "std_norm_image": (0.03 * mean).tolist()}}


def _assert_png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  assert head == PNG_MAGIC, path
  assert os.path.getsize(path) > 5_000, path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """Every result of a 6-block run and its comparison runs; read-only for the tests."""
  tmp_path = tmp_path_factory.mktemp("full_run")
  rng = np.random.default_rng(0)
  main, vgg, sd, eff = (str(tmp_path / d) for d in ("main", "vgg", "sd", "eff"))
  _write(main, "lesion.json", _lesion(rng))
  _write(main, "gradients.json", _paths_json())
  _write(main, "final_metrics.json", {"step": 640, "eval_accuracy": 0.9388,
                                      "eval_error": 0.0612, "eval_loss": 0.31})
  _write(vgg, "lesion.json", _lesion(rng, kind="plain", baseline=0.07,
                                     single=[0.885, 0.9, 0.8975, 0.91, 0.8925, 0.9]))
  _write(sd, "lesion.json", _lesion(rng, baseline=0.058,
                                    single=[0.2 if i in DOWN else 0.06 for i in range(N)]))
  _write(eff, "final_metrics.json", {"step": 640, "eval_accuracy": 0.9404, "eval_error": 0.0596,
                                     "eval_loss": 0.3})
  files = report.write_report(main, vgg_workdir=vgg, sd_workdir=sd, effective_workdir=eff)
  with open(os.path.join(main, "report.md")) as f:
    return main, files, f.read()


def test_single_swaps_are_summarised_by_stage(full_run):
  _, _, md = full_run
  line = next(l for l in md.splitlines() if l.startswith("The 10 single swaps"))
  assert "stage 1: 4 swaps" in line and "stage 2: 3 swaps" in line and "stage 3: 3 swaps" in line
  assert "(blocks 1 and 2)" in line or "(blocks 2 and 1)" in line


def test_every_figure_is_a_real_png(full_run):
  main, files, _ = full_run
  assert sorted(files) == sorted([os.path.join(main, f) for f in ALL_FIGS]
                                 + [os.path.join(main, "report.md")])
  for name in ALL_FIGS:
    _assert_png(os.path.join(main, name))


def test_table_has_our_numbers_and_the_papers(full_run):
  _, _, md = full_run
  rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
  assert "6.12 %" in rows["test error (ResNet-14; the paper's is ResNet-110's)"] and "6.10 %" in rows["test error (ResNet-14; the paper's is ResNet-110's)"]
  eff = rows["effective-path (23 of 6) training test error (the paper's 23 of 54)"]
  assert "5.96 %" in eff
  # A 6-block network's row deletes the paper's share of its blocks: 10 of 54 -> 1 of 6.
  lesion = json.load(open(os.path.join(full_run[0], "lesion.json")))
  r = lesion["random"]
  row = rows["error after deleting 1 random blocks (1 of 6: the paper's 10 of 54)"]
  assert f"{100 * r['mean'][1]:.2f} % ± {100 * r['std'][1]:.2f} %" in row
  # Analytic rows computed with path_counts.py for our n: central interval 1..5 of 6 holds 62/64.
  assert "96.88 % (lengths 1–5, n = 6)" in rows["share of paths of length 19–35"]
  total = path_counts.total_gradient(N, _paths_json()["gradient"]["mean_norm"])
  lo, hi = path_counts.effective_interval(total, 0.9)
  assert f"{lo}–{hi}" in rows["effective path lengths"]
  share = float(path_counts.share_of_paths(N, lo, hi))
  assert f"{100 * share:.2f} %" in rows["share of paths that are effective"]
  assert "0.45 %" in rows["share of paths that are effective"]
  vgg = rows["VGG, any single layer deleted"]
  assert "88.50 %" in vgg and "91.00 %" in vgg


def test_report_links_figures_and_states_computed_findings(full_run):
  _, _, md = full_run
  for name in ALL_FIGS:
    assert f"]({name})" in md
  # E1 text: the downsampling blocks (1-based 3 and 5) at 30 %, the others within 1 point.
  assert "30.00 % (block 3)" in md and "30.00 % (block 5)" in md
  assert "at most 1.00 percentage points (block 6" in md
  assert "Seed 0".lower() in md.lower() and "synthetic test data" in md
  assert "None: every experiment has results." in md


def test_only_final_metrics_lists_missing_experiments_with_commands(tmp_path):
  main = str(tmp_path / "run")
  _write(main, "final_metrics.json", {"step": 64000, "eval_accuracy": 0.94, "eval_error": 0.06,
                                      "eval_loss": 0.3})
  files = report.write_report(main)
  names = {os.path.basename(f) for f in files}
  # Only the analytic figures can be drawn (with the paper's n = 54).
  assert names == {"fig6a_path_lengths.png", "fig7_deletion_removes_long_paths.png",
                   "report.md"}
  for f in files:
    if f.endswith(".png"):
      _assert_png(f)
  md = open(os.path.join(main, "report.md")).read()
  assert "## Missing experiments" in md
  assert f"python -m resnet_ensemble --config=configs/cifar10_resnet110.py --workdir={main} " \
         "--mode=lesion" in md
  assert f"--workdir={main} --mode=gradients" in md
  assert "E1, E3, E4" in md and "E6, E7" in md and "E10" in md and "E8" in md
  assert "VGG-15" in md and "vgg_workdir" in md
  assert "| ResNet-110 test error | 6.00 % (step 64000) | 6.10 % |" in md
  assert "98.02 % (lengths 19–35, n = 54)" in md
  assert "effective-path" not in md.split("## Ours vs paper")[1].split("##")[0]


def test_imagenet_names_the_single_block_figure_fig4(tmp_path):
  rng = np.random.default_rng(1)
  main = str(tmp_path / "imagenet")
  _write(main, "lesion.json", _lesion(rng, data="imagenet2012"))
  files = {os.path.basename(f) for f in report.write_report(main)}
  assert "fig4_imagenet_single_block_deletion.png" in files
  assert "fig3_single_block_deletion.png" not in files
  md = open(os.path.join(main, "report.md")).read()
  assert "configs/imagenet_resnet200.py" in md


def test_e6_results_are_read_under_either_name_the_new_one_first(tmp_path):
  """Runs from before the rename (published results among them) keep paths.json."""
  main = str(tmp_path / "run")
  _write(main, "paths.json", {"n": 3})
  assert workdir_lib.gradients_file(main) == "paths.json"
  assert read.read_runs(main, vgg_workdir=None, sd_workdir=None, effective_workdir=None,
                        seed_workdirs=()).paths == {"n": 3}
  _write(main, "gradients.json", {"n": 5})
  assert workdir_lib.gradients_file(main) == "gradients.json"
  assert workdir_lib.gradients_file(str(tmp_path / "empty")) == "gradients.json"


def test_corrupt_json_is_an_error(tmp_path):
  main = str(tmp_path / "bad")
  os.makedirs(main)
  with open(os.path.join(main, "lesion.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="lesion.json"):
    report.write_report(main)


def test_more_seeds_give_the_error_spread_and_a_missing_seed_its_command(tmp_path):
  main, seed1, seed2 = (str(tmp_path / d) for d in ("r_seed0", "r_seed1", "r_seed2"))
  for wd, seed, error in ((main, 0, 0.0612), (seed1, 1, 0.0650)):
    _write(wd, "final_metrics.json", {"step": 640, "eval_error": error, "eval_loss": 0.3})
    _write(wd, "config.json", {"seed": seed})
  report.write_report(main, seed_workdirs=[seed1, seed2])
  md = open(os.path.join(main, "report.md")).read()
  rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
  spread = float(np.std([0.0612, 0.0650], ddof=1))
  assert (f"6.31 % ± {100 * spread:.2f} % over 2 seeds (seed 0 6.12 %, seed 1 6.50 %)"
          in rows["test error over seeds"])
  assert f"--workdir={seed2} --config.seed=2" in md.split("## Missing experiments")[1]


def test_training_curves_draw_every_run_with_metrics(tmp_path):
  main, eff, vgg = (str(tmp_path / d) for d in ("main", "eff", "vgg"))
  for wd, errors in ((main, (0.30, 0.12, 0.08)), (eff, (0.32, 0.11, 0.09))):
    os.makedirs(wd)
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
      for step, error in zip((100, 200, 300), errors):
        f.write(json.dumps({"step": step, "train_accuracy": 1 - error / 2}) + "\n")
        f.write(json.dumps({"step": step, "eval_error": error}) + "\n")
  names = {os.path.basename(f) for f in report.write_report(
      main, effective_workdir=eff, vgg_workdir=vgg)}  # vgg: no metrics, no curve
  assert "fig_training_curves.png" in names
  _assert_png(os.path.join(main, "fig_training_curves.png"))
  md = open(os.path.join(main, "report.md")).read()
  section = md.split("## Training curves")[1].split("##")[0]
  assert "ResNet (seed ?): test error 8.00 % at step 300 (lowest 8.00 %, step 300)" in section
  assert "effective paths (E8): test error 9.00 % at step 300 (lowest 9.00 %, step 300)" in section
  assert "plain" not in section


def _missing_commands(md: str) -> dict[str, list[list[str]]]:
  """The "Missing experiments" section as {what: [argv, ...]}, each command parsed as a shell
  would (shlex), so a path that needs quoting and lacks it shows up as a wrong argv."""
  out: dict[str, list[list[str]]] = {}
  what = None
  for line in md.split("## Missing experiments")[1].splitlines():
    if line.startswith("- "):
      what = line[2:]
      out[what] = []
    elif line.startswith("  - `"):
      out[what].append(shlex.split(line.strip()[3:-1]))
  return out


def test_missing_commands_name_the_runs_config_file_and_survive_spaces(tmp_path):
  main, seed1, vgg = (str(tmp_path / "my runs" / d) for d in ("q seed0", "q_seed1", "v g g"))
  _write(main, "final_metrics.json", {"step": 600, "eval_error": 0.05, "eval_loss": 0.2})
  report.write_report(main, seed_workdirs=[seed1], vgg_workdir=vgg,
                      config_file="configs/quickstart.py")
  md = open(os.path.join(main, "report.md")).read()
  cmds = _missing_commands(md)
  run = ["python", "-m", "resnet_ensemble", "--config=configs/quickstart.py", f"--workdir={main}"]
  lesion = next(v for k, v in cmds.items() if k.startswith("E1, E3, E4"))
  assert lesion == [run + ["--mode=lesion"]]
  assert next(v for k, v in cmds.items() if k.startswith("E6, E7")) == [run + ["--mode=gradients"]]
  seed = next(v for k, v in cmds.items() if k.startswith("another seed"))
  assert seed == [run[:4] + [f"--workdir={seed1}", "--config.seed=1"]]
  # The comparison runs have their own configs; their workdirs are quoted too.
  vgg_cmds = next(v for k, v in cmds.items() if k.startswith("VGG-15"))
  assert vgg_cmds == [run[:3] + ["--config=configs/cifar10_vgg15.py", f"--workdir={vgg}"],
                      run[:3] + ["--config=configs/cifar10_vgg15.py", f"--workdir={vgg}",
                                 "--mode=lesion"]]
  assert "cifar10_resnet110.py" not in md


def test_missing_training_command_of_a_run_without_results(tmp_path):
  """No results at all: training is the first command, with the run's config and workdir."""
  main = str(tmp_path / "it's here")
  report.write_report(main, config_file="configs/my config.py")
  cmds = _missing_commands(open(os.path.join(main, "report.md")).read())
  training = next(v for k, v in cmds.items() if k.startswith("training results"))
  assert training == [["python", "-m", "resnet_ensemble", "--config=configs/my config.py",
                       f"--workdir={main}"]]


def test_missing_commands_of_imported_weights_repeat_their_flags(tmp_path):
  rng = np.random.default_rng(2)
  main = str(tmp_path / "pre trained")
  lesion = _lesion(rng, data="imagenet2012")
  lesion["config"].update(weights="/my weights/resnet18.safetensors", arch="resnet18")
  _write(main, "lesion.json", lesion)
  report.write_report(main, config_file="configs/imagenet_pretrained.py")
  cmds = _missing_commands(open(os.path.join(main, "report.md")).read())
  paths_cmd = next(v for k, v in cmds.items() if k.startswith("E6, E7"))
  assert paths_cmd == [["python", "-m", "resnet_ensemble",
                        "--config=configs/imagenet_pretrained.py", f"--workdir={main}",
                        "--mode=gradients", "--config.weights=/my weights/resnet18.safetensors",
                        "--config.arch=resnet18"]]


def test_the_report_names_no_folder_of_the_machine_that_measured(tmp_path):
  """Results stored with the measuring machine's paths render without them: the data source as
  its file, weights from the data folder as ``$RESNET_ENSEMBLE_DATA/pretrained/...``, left
  unquoted for the shell to expand."""
  rng = np.random.default_rng(3)
  main = str(tmp_path / "r20")
  lesion = _lesion(rng)
  lesion["config"].update(weights="/mnt/lab/data/pretrained/cifar10/resnet20-12fca82f.th",
                          arch="cifar")
  lesion["data_source"] = ("CIFAR-10 exact-pixel test subset (1017 original test images, "
                           "/home/me/data/cifar10/cifar10-test-exact.npz.xz; E6 batches)")
  _write(main, "lesion.json", lesion)
  report.write_report(main, config_file="configs/cifar10_pretrained.py")
  md = open(os.path.join(main, "report.md")).read()
  assert "test images, cifar10-test-exact.npz.xz; E6 batches)" in md
  assert "/mnt/lab" not in md and "/home/me" not in md
  weights = "--config.weights=$RESNET_ENSEMBLE_DATA/pretrained/cifar10/resnet20-12fca82f.th"
  assert f" {weights} " in md
  paths_cmd = next(v for k, v in _missing_commands(md).items() if k.startswith("E6, E7"))
  assert paths_cmd[0][-2:] == [weights, "--config.arch=cifar"]


def _section(md, title):
  return md.split(f"## {title}")[1].split("\n## ")[0]


def test_gradient_far_below_float64_is_plotted_and_fitted_at_every_length(tmp_path):
  # A paths.json whose norms lie 400 decades down (a very deep network): the float64 values
  # are 0, the log10 fields carry them; decay 10**-0.7 = 0.1995 per block.
  main = str(tmp_path / "deep")
  pj = _paths_json()
  k = np.arange(N + 1)
  log10 = -400.0 - 0.7 * k
  g = pj["gradient"]
  g.update(mean_norm=[0.0] * (N + 1), std_norm=[0.0] * (N + 1),
           log10_mean_norm=log10.tolist(), log10_std_norm=(log10 - 0.5).tolist(),
           log10_mean_norm_image=(log10 - 1).tolist(), log10_std_norm_image=[None] * (N + 1))
  _write(main, "paths.json", pj)
  names = {os.path.basename(f) for f in report.write_report(main)}
  assert {"fig6b_gradient_per_length.png", "fig6c_total_gradient.png"} <= names
  _assert_png(os.path.join(main, "fig6b_gradient_per_length.png"))
  md = open(os.path.join(main, "report.md")).read()
  e6 = _section(md, "E6 / Fig. 6b")
  assert "falls from 1.00e-400 at length 0 to 6.31e-405 at length 6" in e6
  assert "over 7 lengths (0–6) gives ×0.200 per extra block (95 % CI 0.200–0.200)" in e6
  rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
  assert "×0.200 per extra block" in rows["gradient per path length (E6)"]
  assert "50 sampled paths per length" in rows["gradient per path length (E6)"]
  weights = path_counts.relative_weights(path_counts.log10_total_gradient(N, log10))
  lo, hi = path_counts.effective_interval(weights, 0.9)
  assert f"{lo}–{hi} (90 % of total gradient)" in rows["effective path lengths"]


def test_zero_means_of_an_underflowed_paths_json_are_named_and_left_out_of_the_fit(tmp_path):
  main = str(tmp_path / "old")
  pj = _paths_json()
  mean = np.asarray(pj["gradient"]["mean_norm"])
  mean[4:] = 0.0  # as a float32 backward pass left them
  pj["gradient"]["mean_norm"] = mean.tolist()
  _write(main, "paths.json", pj)
  report.write_report(main)
  e6 = _section(open(os.path.join(main, "report.md")).read(), "E6 / Fig. 6b")
  assert "Lengths 4–6 have a mean norm of exactly 0" in e6 and "--mode=gradients" in e6
  assert "over 4 lengths (0–3) gives ×0.500 per extra block" in e6


def test_decay_fit_interval_holds_the_true_factor():
  rng = np.random.default_rng(0)
  k = np.arange(55)
  covered = 0
  for _ in range(200):
    log10 = -5 + np.log10(0.22) * k + 0.3 * rng.standard_normal(k.size)
    fit = report.decay_fit(k, log10)
    assert fit["lo"] < fit["factor"] < fit["hi"] and fit["lengths"] == 55
    covered += fit["lo"] <= 0.22 <= fit["hi"]
  assert 180 <= covered <= 198  # a 95 % interval: ~190 of 200
  assert report.decay_fit([0, 1], [0.0, -1.0]) is None  # a line needs three lengths for a CI


# ---------------------------------------------------------------------------------------------
# The computed numbers, against values worked out by hand for the 6-block fixtures.

def _rows(md):
  return {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}


def test_e7_interval_of_halving_norms_is_worked_out_by_hand():
  # mean norm 2 * 0.5**k: total(k) = C(6, k) * 2 * 0.5**k, proportional to
  # 1, 3, 3.75, 2.5, 0.9375, 0.1875, 0.015625 (sum 11.390625; 90 % = 10.2516). No 4 lengths
  # reach it (0..3 holds 10.25); of the 5-length windows 0..4 holds most (11.1875).
  total, lo, hi, share = path_figures.effective(N, _paths_json())
  assert (lo, hi) == (0, 4)
  assert share == pytest.approx(57 / 64)  # C(6,0..4) = 1 + 6 + 15 + 20 + 15 of 64 paths
  np.testing.assert_allclose(total, np.array([1, 3, 3.75, 2.5, 0.9375, 0.1875, 0.015625]) / 3.75)
  with pytest.raises(ValueError, match="expected n\\+1 = 8"):
    path_figures.effective(7, _paths_json())


def test_e5_interval_is_the_papers_at_its_n_and_the_narrowest_elsewhere():
  assert path_figures.central_interval(54) == (19, 35)       # the paper's, 98.0 %
  assert path_figures.narrowest_central(54, 0.95) == (20, 34)
  assert float(path_counts.share_of_paths(54, 20, 34)) >= 0.95 > float(path_counts.share_of_paths(54, 21, 33))
  assert path_figures.central_interval(6) == (1, 5)          # 62 of 64 paths; 2..4 holds 50
  assert path_figures.deleted_counts(54) == [1, 10, 20]
  assert path_figures.deleted_counts(6) == [1, 2]            # 1, 10, 20 scaled by 6 / 54


def test_decay_fit_of_an_exact_exponential_and_its_table_row(full_run):
  k = np.arange(N + 1)
  fit = report.decay_fit(k, np.log10(2.0 * 0.5**k))
  assert fit["factor"] == pytest.approx(0.5) and fit["lo"] == pytest.approx(0.5)
  assert (fit["first"], fit["last"], fit["lengths"]) == (0, 6, 7)
  row = _rows(full_run[2])["gradient per path length (E6)"]
  assert ("×0.500 per extra block (95 % CI 0.500–0.500); log-linear fit over lengths 0–6 "
          "(7 lengths), 50 sampled paths per length") in row


def test_e7_e9_and_e10_sections_state_the_hand_computed_numbers(full_run):
  _, _, md = full_run
  rows = _rows(md)
  assert "| 0–4 (90 % of total gradient) |" in rows["effective path lengths"]
  assert "| 89.06 % |" in rows["share of paths that are effective"]
  # E7: the peak is length 2, 3.75 / 11.390625 = 32.9 % of the total.
  e7 = _section(md, "E7 / Fig. 6c")
  assert ("paths of length 0–4 (0–8 layers for basic blocks), which are 89.06 % of all paths; "
          "the total peaks at length 2 (which alone holds 32.9 % of it)") in e7
  # E9: d = 2 of 6 deleted; C(4, 0) / C(6, 0) = 1 and C(4, 3) / C(6, 3) = 4 / 20.
  assert ("Deleting 2 of 6 blocks leaves 100.00 % of the length-0 paths but only 20.00 % of "
          "the typical length-3 ones (curves for d = 1, 2).") in _section(md, "E9 / Fig. 7")
  # E10: non-downsampling blocks 0, 1, 3, 5 err 0.0612 + 0.002 i (mean 6.57 %) vs 6.00 %.
  assert ("Mean error over the non-downsampling deletions: 6.57 % without vs 6.00 % with "
          "stochastic depth; at the downsampling blocks 30.00 % vs 20.00 % (block 3), "
          "30.00 % vs 20.00 % (block 5).") in _section(md, "E10 / Fig. 8")


def test_e3_and_e4_sections_state_the_fixtures_numbers(full_run):
  main, _, md = full_run
  lesion = json.load(open(os.path.join(main, "lesion.json")))
  r = lesion["random"]
  rise = 100 * np.max(np.diff(r["mean"]))
  assert (f"All blocks eligible (20 draws per k): mean error {100 * r['mean'][0]:.2f} % at k = 0, "
          f"{100 * r['mean'][1]:.2f} % ± {100 * r['std'][1]:.2f} % at k = 1") in md  # 10 of 54 -> 1 of 6
  assert f"the largest rise between consecutive k is {rise:.2f} percentage points" in md
  ro = lesion["reorder"]
  tau, err = np.concatenate(ro["tau"]), np.concatenate(ro["error"])
  e4 = _section(md, "E4 / Fig. 5b")
  assert (f"Over 30 draws (10 per k, k = 1..3 swaps), Kendall tau spans {tau.min():.3f}.."
          f"{tau.max():.3f}; the mean error grows from {100 * np.mean(ro['error'][0]):.2f} % "
          f"(k = 1, mean tau {np.mean(ro['tau'][0]):.3f})") in e4
  assert f"r = {np.corrcoef(tau, err)[0, 1]:.2f}." in e4


def test_random_deletion_stats_are_recomputed_from_the_draws():
  s = lesion_figures.random_stats({"k": [0, 1], "error": [[0.1, 0.3], [0.5, 0.9]]})
  np.testing.assert_allclose(s["mean"], [0.2, 0.7])
  np.testing.assert_allclose(s["std"], [0.1, 0.2])
  np.testing.assert_allclose(s["min"], [0.1, 0.5])
  np.testing.assert_allclose(s["max"], [0.3, 0.9])
  with pytest.raises(ValueError, match="neither 'mean' nor 'error'"):
    lesion_figures.random_stats({"k": [0, 1]})
  k = np.array([0, 1, 2, 5, 20])
  assert lesion_figures.k_row(k, 10) == 3 and lesion_figures.k_row(k, 20) == 4


def test_what_was_run_and_the_error_rows(full_run):
  _, _, md = full_run
  assert "- Gradient per path length (E6, E7): n = 6, checkpoint step 640, 50 samples per k, " \
         "batch 16." in md
  assert "- Effective-path training (E8): step 640, test error 5.96 %." in md
  assert ("VGG-8 (plain, 6 deletable layers, stages [6], downsampling blocks none)") in md
  assert "| 6.12 % (ResNet-14, step 640) | 6.10 % |" in _rows(md)["test error (ResNet-14; the paper's is ResNet-110's)"]


def test_a_partial_lesion_study_lists_each_missing_part(tmp_path):
  rng = np.random.default_rng(3)
  main = str(tmp_path / "partial")
  lesion = _lesion(rng)
  del lesion["reorder"]
  lesion["random_no_downsampling"] = {"k": [0], "mean": [0.06], "std": [0.0], "min": [0.06],
                                      "max": [0.06]}
  lesion.update(finished=False, num_steps=1000)
  _write(main, "lesion.json", lesion)
  report.write_report(main)
  md = open(os.path.join(main, "report.md")).read()
  assert md.splitlines()[0].startswith(
    f"> **UNFINISHED RUN: analysed before the end of training** ({main} at step 640 of 1000;")
  cmds = _missing_commands(md)
  lesion_cmd = [["python", "-m", "resnet_ensemble", "--config=configs/cifar10_resnet110.py",
                 f"--workdir={main}", "--mode=lesion"]]
  assert cmds["E3 variant without downsampling blocks (lesion.json has no "
              "'random_no_downsampling' with k > 0):"] == lesion_cmd
  assert cmds["E4 (lesion.json has no 'reorder'):"] == lesion_cmd
  assert not any(what.startswith(("E1 ", "E3 (")) for what in cmds)
  # Fig. 5a draws the variant that ran; the table row has it alone.
  row = _rows(md)["error after deleting 1 random blocks (1 of 6: the paper's 10 of 54)"]
  assert "(all blocks eligible)" in row and "never deleted" not in row


def test_block_count_from_the_config_when_no_analysis_ran(tmp_path):
  main = str(tmp_path / "cfg")
  _write(main, "config.json", {"seed": 3, "model": {"name": "cifar_resnet", "depth": 20}})
  runs = read.read_runs(main, vgg_workdir=None, sd_workdir=None, effective_workdir=None,
                        seed_workdirs=())
  assert read.n_blocks(runs) == (9, "n from config.json")  # (20 - 2) / 2
  report.write_report(main)
  md = open(os.path.join(main, "report.md")).read()
  # 9 blocks: 3..6 holds (84 + 126 + 126 + 84) / 512 = 82.0 %; 2..7 holds 492 / 512.
  assert "| 96.09 % (lengths 2–7, n = 9) |" in _rows(md)["share of paths of length 19–35"]
  assert "Of the 2^9 paths (n from config.json)" in md
  assert "E5, E9 use the paper's n = 54" not in md


def test_report_md_sections_come_in_the_papers_order(full_run):
  """Smoke test of report.md's layout: the run, the table, then the figures E1..E10."""
  _, _, md = full_run
  titles = [line[3:] for line in md.splitlines() if line.startswith("## ")]
  assert titles == ["What was run", "Ours vs paper", "E1 / Fig. 3 — single-block deletion",
                    "E3 / Fig. 5a — deleting k random blocks", "E4 / Fig. 5b — reordering blocks",
                    "E4, one swap — which reorderings hurt (not in the paper)",
                    "E5 / Fig. 6a — path lengths",
                    "E6 / Fig. 6b — gradient magnitude per path length",
                    "E7 / Fig. 6c — total gradient per path length",
                    "E9 / Fig. 7 — deletion removes long paths",
                    "E10 / Fig. 8 — stochastic depth", "Missing experiments"]


def test_an_imported_cifar_resnet_is_named_by_its_depth_and_a_rising_gradient_says_so(tmp_path):
  """An imported network whose depth was read from the file (arch "cifar") is named by its
  block count, its error row says the paper's number is ResNet-110's, and a gradient that grows
  with path length is not called a decay."""
  rng = np.random.default_rng(3)
  main = str(tmp_path / "imported")
  lesion = _lesion(rng)
  lesion["config"].update(weights="/w/resnet14.th", arch="cifar")
  _write(main, "lesion.json", lesion)
  rising = _paths_json()
  k = np.arange(N + 1)
  rising["gradient"].update(mean_norm=(1e-3 * 1.5**k).tolist(),
                            std_norm=(3e-4 * 1.5**k).tolist())
  _write(main, "paths.json", rising)
  report.write_report(main)
  md = open(os.path.join(main, "report.md")).read()
  rows = _rows(md)
  assert "| 6.12 % (ResNet-14 (pretrained), lesion baseline) | 6.10 % |" in rows[
      "test error (ResNet-14 (pretrained); the paper's is ResNet-110's)"]
  assert rows["gradient per path length (E6)"].split("|")[2].strip().startswith(
      "no decay, ×1.500 per extra block")
  assert "rises from 1.00e-03 at length 0 to 1.14e-02 at length 6" in md


def test_e1_spread_over_seeds(tmp_path):
  """Fig. 3 with the seeds' E1: their mean and spread per block, and the text states them."""
  from resnet_ensemble.report.page import Page

  def lesion(errors):
    return {"single": {"error": errors}, "baseline": {"error": 0.05},
            "layout": {"n_blocks": 3, "downsampling": [1]}, "model_kind": "resnet",
            "config": {"model": {"name": "cifar_resnet", "depth": 8}, "data": {"name": "digits"}}}

  main, seeds = lesion([0.1, 0.9, 0.3]), [lesion([0.2, 0.8, 0.1]), lesion([0.3, 0.9, 0.2])]
  page = Page(str(tmp_path))
  lesion_figures.fig_single(page, main, None, seeds)
  _assert_png(str(tmp_path / "fig3_single_block_deletion.png"))
  text = " ".join(page.sections[0][2])
  # Blocks 1 and 3 (block 2 downsamples): per seed means 0.2, 0.15, 0.25 -> 20.00 % ± 5.00 %.
  assert "Over 3 seeds" in text and "20.00 % ± 5.00 %" in text
  assert lesion_figures.seeds_spread(main, []) is None
  assert lesion_figures.seeds_spread(main, [lesion([0.1, 0.2])]) is None  # another shape
