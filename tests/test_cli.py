"""The command line: the quickstart end to end, and clear errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=600, fast_compile=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if not fast_compile:  # long runs: optimised code pays for its longer compile
    env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "resnet_ensemble", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


FIGURES = ["fig3_single_block_deletion.png", "fig5a_delete_k_blocks.png", "fig5b_reorder.png",
           "fig5c_single_swaps.png",
           "fig6a_path_lengths.png", "fig6b_gradient_per_length.png",
           "fig6c_total_gradient.png", "fig7_deletion_removes_long_paths.png"]


# The quickstart's pipeline (every run and analysis of the paper) at a tiny size.
TINY_QUICKSTART = ["--config=configs/quickstart.py", "--config.model.width=4",
                   "--config.train.num_steps=12", "--config.train.eval_every=6",
                   "--config.train.log_every=6", "--config.checkpoint.every=6",
                   "--config.optim.boundaries=(8,10)", "--config.lesion.draws=2",
                   "--config.lesion.reorder_max_swaps=2", "--config.lesion.reorder_draws=2",
                   "--config.paths.samples_per_k=2", "--config.paths.chunk=10"]
RUNS = ("seed0", "seed1", "seed2", "e8", "sd", "plain")


@pytest.mark.slow
def test_quickstart_all_runs_every_experiment_and_resumes(tmp_path):
  workdir = tmp_path / "quickstart"
  # Stopped after training the stack (as a kill after its last checkpoint would leave it):
  # --mode=all then trains only the plain network, analyses, and reports.
  first = cli(*TINY_QUICKSTART, f"--workdir={workdir}", "--mode=train")
  assert first.returncode == 0, first.stderr[-3000:]
  proc = cli(*TINY_QUICKSTART, f"--workdir={workdir}", "--mode=all")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "as one program (1/" not in proc.stdout and "train the plain network (1/" in proc.stdout
  for run in RUNS:
    assert (workdir / run / "final_metrics.json").exists(), run
  for run in ("seed0", "seed1", "seed2", "sd", "plain"):
    assert (workdir / run / "lesion.json").exists(), run
  assert (workdir / "seed0" / "gradients.json").exists()
  # E8 and E10 come from runs trained with their samplers, the plain panel from a plain net.
  config = lambda run: json.loads((workdir / run / "config.json").read_text())
  assert config("e8")["gates"]["sampler"] == "effective" and config("e8")["gates"]["k"] == 4
  assert config("sd")["gates"]["sampler"] == "stochastic_depth"
  assert config("plain")["model"]["name"] == "plain"
  assert json.loads((workdir / "sd" / "lesion.json").read_text())["config"]["gates"][
      "sampler"] == "stochastic_depth"
  report = (workdir / "report.md").read_text()
  for name in FIGURES + ["fig8_stochastic_depth.png", "fig_training_curves.png"]:
    assert (workdir / name).stat().st_size > 1000 and name in report, name
  assert "None: every experiment has results." in report
  assert "**Small-scale numbers**" in report and "launch/reproduce_cifar10.sh" in report
  assert "effective-path (4 of 9) training test error" in report
  assert "over 3 seeds" in report
  # Everything done: a rerun only rewrites the report.
  results = [workdir / r / f for r in RUNS for f in ("lesion.json", "gradients.json")
             if (workdir / r / f).exists()]
  before = {p: p.stat().st_mtime_ns for p in results}
  again = cli(*TINY_QUICKSTART, f"--workdir={workdir}", "--mode=all")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "== all:" not in again.stdout and "report:" in again.stdout
  assert {p: p.stat().st_mtime_ns for p in results} == before


def test_analyses_without_a_checkpoint_name_the_workdir(tmp_path):
  proc = cli("--config=configs/quickstart.py", "--config.stack=()",
             f"--workdir={tmp_path / 'empty'}", "--mode=lesion")
  assert proc.returncode == 2
  assert "no trained checkpoint in workdir" in proc.stderr and "empty" in proc.stderr


def test_mode_paths_is_an_alias_of_gradients_that_says_so(tmp_path):
  proc = cli("--config=configs/quickstart.py", "--config.stack=()",
             f"--workdir={tmp_path / 'empty'}", "--mode=paths")
  assert proc.returncode == 2
  assert "--mode=paths is now --mode=gradients" in proc.stderr
  assert "no trained checkpoint in workdir" in proc.stderr  # then E6's own check ran


@pytest.mark.parametrize("args, message", [
    (["--config.train.batchsize=3"], "unknown config field 'batchsize' in "
                                     "--config.train.batchsize=3: Did you mean \"batch_size\""),
    (["--config.model.name=resnet"], "unknown model name 'resnet'"),
    (["--config.data.name=mnist"], "unknown dataset 'mnist'"),
    (["--config.model.depth=100"], "6n+2"),
    (["--config.train.batch_size=0"], "--config.train.batch_size=0: must be an integer >= 1"),
    (["--config.train.steps_per_call=0"], "--config.train.steps_per_call=0: must be"),
    # The plain network of Fig. 3 trains last: its fields are checked first all the same.
    (["--config.paper.plain_width=0"], "--config.paper.plain_width=0: must be an integer >= 1"),
    (["--config.paper.plain_stages=(4,0,4)"], "--config.paper.plain_stages=(4, 0, 4): layers"),
    (["--config.train.batch_size=abc"], "--config.train.batch_size=abc"),
    (["--config=configs/no_such_file.py"], "cannot load the config file "
                                           "--config=configs/no_such_file.py"),
    (["--workdir="], "--workdir is empty"),
    # Gate settings are checked before the data is looked for (none is at that path).
    (["--config=configs/cifar10_resnet110.py", "--config.data.dir=/nonexistent",
      "--config.gates.sampler=effective", "--config.gates.k=99"], "gates.k=99"),
    (['--config.stack=("a", "b:model.depth=20")'], "--config.stack entry 'b:model.depth=20': "
                                                   "model.depth is shared by the runs"),
    (["stray"], "unexpected argument(s) 'stray': every option is a flag"),
    # --mode=all checks the analyses' settings before it trains.
    (["--mode=all", "--config.lesion.max_k=99"], "--config.lesion.max_k=99 is larger than the "
                                                 "number of blocks (9)"),
])
def test_bad_input_is_one_line_naming_the_problem_and_writes_nothing(tmp_path, args, message):
  workdir = tmp_path / "w"
  config = [a for a in args if a.startswith("--config=")] or ["--config=configs/quickstart.py"]
  proc = cli(*config, f"--workdir={workdir}", *[a for a in args if not a.startswith("--config=")])
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("resnet_ensemble: error: "), lines
  assert message in lines[0]
  assert not workdir.exists()


def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path):
  (tmp_path / "a_file").write_text("")
  proc = cli("--config=configs/quickstart.py", f"--workdir={tmp_path / 'a_file' / 'w'}")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "cannot create the workdir" in lines[0], lines


def test_missing_data_names_the_path(tmp_path):
  missing = tmp_path / "no_cifar_here"
  proc = cli("--config=configs/cifar10_resnet110.py", f"--workdir={tmp_path / 'w'}",
             "--config.data.source=bin", f"--config.data.dir={missing}")
  assert proc.returncode == 2
  assert str(missing) in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()  # the data is looked for before the workdir is made


def test_mode_runs_prints_each_runs_workdir_and_writes_nothing(tmp_path):
  workdir = tmp_path / "w"
  proc = cli("--config=configs/quickstart.py", f"--workdir={workdir}", "--mode=runs",
             '--config.stack=("e8:gates.sampler=effective,gates.k=5", "seed1:seed=1")')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == [str(workdir / "e8"), str(workdir / "seed1")]
  proc = cli("--config=configs/quickstart.py", f"--workdir={workdir}", "--mode=runs")
  assert proc.stdout.splitlines() == [str(workdir / r) for r in ("seed0", "seed1", "seed2", "e8",
                                                                  "sd")]
  proc = cli("--config=configs/quickstart.py", "--config.stack=()", f"--workdir={workdir}",
             "--mode=runs")
  assert proc.stdout.splitlines() == [str(workdir)]
  assert not workdir.exists()


def test_a_config_file_without_get_config_is_named_as_such(tmp_path):
  config = tmp_path / "not_a_config.py"
  config.write_text("seed = 1\n")
  proc = cli(f"--config={config}", f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"resnet_ensemble: error: cannot load the config file --config={config}: it defines no "
      "get_config() (a config file is a Python file whose get_config() returns the config; "
      "see configs/)"]


def test_an_eval_batch_the_devices_do_not_divide_is_refused_before_the_workdir_is_made(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-m", "resnet_ensemble", "--config=configs/quickstart.py",
                         f"--workdir={tmp_path / 'w'}", "--mode=all",
                         "--config.eval.batch_size=7"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "resnet_ensemble: error: eval.batch_size = 7 must be divisible by the number of devices (2)"]
  assert not (tmp_path / "w").exists()


def _paper(tiny):
  """The paper's pipeline on the tiny ResNet-8: two seeds, E10's run and the plain network."""
  return tiny(**{"stack": ("seed0", "seed1:seed=1",
                           "sd:gates.sampler=stochastic_depth,gates.p_last=0.5"),
                 "paper.plain": True, "paper.plain_stages": (1, 1, 1), "paper.plain_width": 4,
                 "lesion.max_k": 3, "lesion.draws": 2, "lesion.reorder_max_swaps": 1,
                 "lesion.reorder_draws": 2, "paths.samples_per_k": 2, "paths.chunk": 4,
                 "paths.batch_size": 32})


def test_mode_all_loads_the_data_once_and_restores_each_run_once(tmp_path, tiny, monkeypatch):
  from resnet_ensemble import __main__ as main, config as config_lib, data, restore
  loads, restores, checks = [], [], []

  def counted(calls, fn, key):
    def wrapper(*args, **kwargs):
      calls.append(key(*args))
      return fn(*args, **kwargs)
    return wrapper

  monkeypatch.setattr(data, "load", counted(loads, data.load, lambda c: c.name))
  monkeypatch.setattr(restore, "load_trained", counted(
      restores, restore.load_trained, lambda c, w, *a: os.path.basename(w)))
  monkeypatch.setattr(config_lib, "_checked", {})
  monkeypatch.setattr(config_lib, "_check", counted(
      checks, config_lib._check, lambda c: c.model.name))
  main.run_mode("all", _paper(tiny), str(tmp_path / "w"))
  assert loads == ["digits"]  # one dataset: every run trains and is analysed on one load
  assert sorted(restores) == ["plain", "sd", "seed0", "seed1"]  # once each, after training
  assert sorted(checks) == ["cifar_resnet", "plain"]  # the stack's config and the plain one's
  assert (tmp_path / "w" / "report.md").exists()


def test_missing_data_leaves_no_workdir(tmp_path, tiny):
  from resnet_ensemble import __main__ as main
  missing, workdir = tmp_path / "no_cifar_here", tmp_path / "w"
  config = _paper(tiny)
  config.data.name, config.data.source, config.data.dir = "cifar10", "bin", str(missing)
  for mode in ("all", "train"):
    with pytest.raises(FileNotFoundError, match="no_cifar_here"):
      main.run_mode(mode, config, str(workdir))
    assert not workdir.exists()
