"""No preemption, crash or config change can fake or lose a result.

Each test trains the tiny config (a ResNet-8 of width 4 on the embedded digits) for real."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_ensemble import checkpoint, lesion, report, restore, train, workdir as workdir_lib
from resnet_ensemble.writers import read_jsonl
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_STUDY = {"lesion.max_k": 1, "lesion.draws": 1, "lesion.reorder_max_swaps": 1,
               "lesion.reorder_draws": 1, "lesion.chunk": 4, "paths.samples_per_k": 2,
               "paths.chunk": 4, "paths.batch_size": 16}


def _checkpoints(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _restore(workdir):
  return checkpoint.restore_latest(checkpoint.make_manager(str(workdir)), None)


def _corrupt(workdir, step: int) -> None:
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step))):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(7)


# ----------------------------------------------------------------------------- preemption


def _cli(workdir, *args, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return subprocess.Popen(
      [sys.executable, "-m", "resnet_ensemble", "--config=configs/quickstart.py",
       "--config.stack=()", f"--workdir={workdir}", "--config.model.depth=8", "--config.model.width=4",
       "--config.train.steps_per_call=1", "--config.train.log_every=2",
       "--config.train.eval_every=0", "--config.checkpoint.every=0",
       *[f"--config.{k}={v}" for k, v in SMALL_STUDY.items()], *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      **kwargs)


@pytest.mark.slow
def test_sigterm_in_mode_all_stops_without_analyses_and_the_same_command_finishes(tmp_path):
  """The Cloud TPU spot recipe: --mode=all preempted mid-training, then run again."""
  workdir = tmp_path / "w"
  args = ("--mode=all", "--config.train.num_steps=400")
  proc = _cli(workdir, *args)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and not (
      metrics.exists() and sum("train_loss" in l for l in metrics.read_text().splitlines()) >= 2):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM: a scheduler sees "not done"
  assert "SIGTERM: saved a checkpoint at step" in err and "of 400" in err
  stopped = int(_checkpoints(workdir)[-1])
  assert 0 < stopped < 400
  assert not (workdir / "lesion.json").exists() and not (workdir / "report.md").exists()
  assert not (workdir / workdir_lib.LOCK_FILE).exists()
  # The analyses alone refuse the unfinished run...
  lesion_only = _cli(workdir, "--mode=lesion", "--config.train.num_steps=400")
  _, err = lesion_only.communicate(timeout=600)
  assert lesion_only.returncode == 2 and f"step {stopped} of train.num_steps=400" in err
  assert len(err.strip().splitlines()) == 1, err
  # ...and the same command resumes training to the end, then analyses.
  again = _cli(workdir, *args)
  out, err = again.communicate(timeout=900)
  assert again.returncode == 0, err[-3000:]
  assert f"resumed from {workdir} at step {stopped}" in out
  assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 400
  study = json.loads((workdir / "lesion.json").read_text())
  assert study["checkpoint_step"] == 400 and study["finished"] is True
  assert not (workdir / "report.md").read_text().startswith("> **UNFINISHED")
  # Every step's metrics once: the rows after the checkpoint were not kept twice.
  steps = [r["step"] for r in read_jsonl(str(metrics)) if "train_loss" in r]
  assert steps == sorted(set(steps)) and steps[-1] == 400


def test_an_unfinished_run_is_analysed_only_when_asked_and_the_report_says_so(tmp_path):
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 3}), workdir)
  config = tiny_config(**SMALL_STUDY)  # num_steps 6: the run stands at 3
  with pytest.raises(restore.UnfinishedRunError, match="step 3 of train.num_steps=6"):
    lesion.run_study(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "lesion.json"))
  study = lesion.run_study(config, workdir, allow_unfinished=True)
  assert study["finished"] is False and study["checkpoint_step"] == 3
  report.write_report(workdir)
  first = open(os.path.join(workdir, "report.md")).read().splitlines()[0]
  assert first.startswith("> **UNFINISHED RUN") and "step 3 of 6" in first


# ----------------------------------------------------------------------------- config guard


def test_a_changed_optimizer_setting_is_refused_and_every_checkpoint_kept(tmp_path):
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 3}), workdir)
  before = _checkpoints(workdir)
  with pytest.raises(workdir_lib.ConfigMismatchError,
                     match=r"optim.momentum: workdir has 0.9, this command has 0.0"):
    train.train_and_evaluate(tiny_config(**{"optim.momentum": 0.0}), workdir)
  assert _checkpoints(workdir) == before  # nothing renamed
  assert json.load(open(os.path.join(workdir, "config.json")))["optim"]["momentum"] == 0.9
  train.train_and_evaluate(tiny_config(), workdir)  # the original command resumes at 3
  assert int(_restore(workdir)["step"]) == 6
  assert "3" in _checkpoints(workdir)


def test_a_changed_seed_is_refused_and_runtime_fields_may_change(tmp_path):
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 3}), workdir)
  with pytest.raises(workdir_lib.ConfigMismatchError, match="seed: workdir has 0, this command has 1"):
    train.train_and_evaluate(tiny_config(**{"seed": 1}), workdir)
  assert json.load(open(os.path.join(workdir, "config.json")))["seed"] == 0
  # Logging and eval cadence, steps per call: how the run executes, not what it computes.
  train.train_and_evaluate(tiny_config(**{"train.log_every": 1, "train.eval_every": 6,
                                          "train.steps_per_call": 3}), workdir)
  assert int(_restore(workdir)["step"]) == 6


def test_a_deleted_config_json_does_not_switch_the_guard_off(tmp_path):
  """Each checkpoint records its run's config: without config.json another seed is still
  refused, config.json is written back from the checkpoints, and the original command resumes."""
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 3}), workdir)
  os.remove(os.path.join(workdir, "config.json"))
  before = _checkpoints(workdir)
  with pytest.raises(workdir_lib.ConfigMismatchError, match="seed: workdir has 0, this command has 1"):
    train.train_and_evaluate(tiny_config(**{"seed": 1}), workdir)
  assert _checkpoints(workdir) == before
  assert json.load(open(os.path.join(workdir, "config.json")))["seed"] == 0  # written back
  train.train_and_evaluate(tiny_config(), workdir)
  assert int(_restore(workdir)["step"]) == 6


def test_a_checkpoint_of_another_structure_is_named_and_nothing_renamed(tmp_path):
  """Past the config guard (an analysis compares only model and data), the checkpoint's own
  metadata still guards: another optimizer's state is named, nothing renamed."""
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 3}), workdir)
  before = _checkpoints(workdir)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"opt_state/1/0/trace/\S+: in the checkpoint, not in this run's state"):
    lesion.run_study(tiny_config(**{"optim.momentum": 0.0, "train.num_steps": 3,
                                    **SMALL_STUDY}), workdir)
  assert _checkpoints(workdir) == before


def test_checkpoints_none_of_which_reads_are_refused_never_restarted(tmp_path):
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(), workdir)  # checkpoints 3 and 6
  for step in (3, 6):
    _corrupt(workdir, step)
  with pytest.raises(checkpoint.CheckpointError, match="none of the 2 checkpoints .* could be read"):
    train.train_and_evaluate(tiny_config(), workdir)
  assert _checkpoints(workdir) == ["3", "6"]  # nothing renamed, nothing restarted
  with pytest.raises(checkpoint.CheckpointError, match="nothing was renamed"):
    lesion.run_study(tiny_config(**SMALL_STUDY), workdir)  # not an AttributeError


def test_the_command_line_says_an_unreadable_workdir_in_one_line(tmp_path):
  workdir = tmp_path / "w"
  first = _cli(workdir, "--config.train.num_steps=2")
  _, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  _corrupt_arrays(workdir, 2)
  again = _cli(workdir, "--config.train.num_steps=4")
  _, err = again.communicate(timeout=600)
  assert again.returncode == 2
  assert err.strip().startswith("resnet_ensemble: error: none of the 1 checkpoints")
  assert len(err.strip().splitlines()) == 1, err  # not orbax's pages of tracebacks


def _corrupt_arrays(workdir, step: int) -> None:
  """Cuts the array data of checkpoint ``step`` short, its metadata left whole: orbax's reader
  fails in flight, the case that printed thousands of lines of tracebacks."""
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step))):
    if os.path.basename(root) == "d":
      for name in files:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(7)


def test_an_unreadable_checkpoint_set_aside_costs_one_line_not_pages_of_tracebacks(tmp_path):
  workdir = tmp_path / "w"
  first = _cli(workdir, "--config.train.num_steps=4", "--config.checkpoint.every=2",
               "--config.checkpoint.max_to_keep=3")
  _, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  assert _checkpoints(workdir) == ["2", "4"]
  _corrupt_arrays(workdir, 4)
  again = _cli(workdir, "--config.train.num_steps=4", "--config.checkpoint.every=2",
               "--config.checkpoint.max_to_keep=3")
  out, err = again.communicate(timeout=600)
  assert again.returncode == 0, err[-3000:]
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
  assert f"checkpoint step 4 in {workdir}/checkpoints is unreadable" in out
  assert _checkpoints(workdir) == ["2", "4", "4.unreadable-0"]


def test_a_set_aside_checkpoint_is_named_at_every_later_start(tmp_path, capsys):
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(), workdir)
  _corrupt(workdir, 6)
  train.train_and_evaluate(tiny_config(), workdir)  # 6 set aside: step 3 reads
  assert "6.unreadable-0" in _checkpoints(workdir)
  capsys.readouterr()
  train.train_and_evaluate(tiny_config(), workdir)
  assert "unreadable checkpoint(s) were set aside" in capsys.readouterr().out


# ----------------------------------------------------------------------------- divergence


def test_a_non_finite_state_is_never_saved_and_the_last_finite_checkpoint_is_named(tmp_path):
  workdir = str(tmp_path / "w")
  config = tiny_config(**{"optim.learning_rate": 1e30, "optim.warmup_steps": 0,
                          "checkpoint.every": 1, "checkpoint.max_to_keep": 2,
                          "train.log_every": 100, "train.eval_every": 0})
  with pytest.raises(FloatingPointError, match=r"The last finite checkpoint is step (\d+)") as e:
    train.train_and_evaluate(config, workdir)
  last = int(e.value.args[0].split("The last finite checkpoint is step ")[1].split(" ")[0])
  assert _checkpoints(workdir)[-1] == str(last)
  state = _restore(workdir)
  assert int(state["step"]) == last
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


# ----------------------------------------------------------------------------- the lock


def _write_lock(workdir, host: str, pid: int, age_s: float = 0.0) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, workdir_lib.LOCK_FILE)
  with open(path, "w") as f:
    json.dump({"host": host, "pid": pid, "started": "2026-11-29T00:00:00Z"}, f)
  if age_s:
    os.utime(path, (time.time() - age_s, time.time() - age_s))
  return path


def test_a_second_job_on_a_running_workdir_is_refused(tmp_path):
  workdir = tmp_path / "w"
  first = _cli(workdir, "--config.train.num_steps=100000")
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and "train_loss" in metrics.read_text()):
    time.sleep(0.1)
  try:
    with pytest.raises(workdir_lib.WorkdirError,
                       match=f"in use by another job .*pid {first.pid}"):
      train.train_and_evaluate(tiny_config(), str(workdir))
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
  assert first.returncode == 143
  assert not (workdir / workdir_lib.LOCK_FILE).exists()  # released on the way out


def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path):
  here = socket.gethostname()
  dead = subprocess.Popen(["true"])
  dead.wait()
  cases = [("dead process on this host", here, dead.pid, 0.0, True),
           ("no heartbeat from another host", "elsewhere", 1, workdir_lib.STALE_S + 60, True),
           ("live process on this host", here, os.getppid(), 0.0, False),
           ("fresh heartbeat from another host", "elsewhere", 1, 0.0, False)]
  for name, host, pid, age, taken in cases:
    workdir = str(tmp_path / name.replace(" ", "_"))
    _write_lock(workdir, host, pid, age)
    if taken:
      train.train_and_evaluate(tiny_config(**{"train.num_steps": 1}), workdir)
      assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE)), name
    else:
      with pytest.raises(workdir_lib.WorkdirError, match="in use by another job"):
        train.train_and_evaluate(tiny_config(**{"train.num_steps": 1}), workdir)
      assert os.listdir(workdir) == [workdir_lib.LOCK_FILE], name  # nothing written


# ----------------------------------------------------------------------------- validate first


def test_an_invalid_config_writes_nothing_and_the_corrected_one_runs(tmp_path):
  workdir = tmp_path / "w"
  for bad, message in [({"model.depth": 111}, "6n\\+2"), ({"gates.sampler": "effective",
                                                          "gates.k": 99}, "gates.k=99"),
                       ({"train.batch_size": 0}, "train.batch_size=0"),
                       ({"train.steps_per_call": 0}, "train.steps_per_call=0")]:
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(tiny_config(**bad), str(workdir))
    assert not workdir.exists(), bad
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 1}), str(workdir))
  assert json.loads((workdir / "config.json").read_text())["model"]["depth"] == 8


def test_metrics_after_the_resumed_checkpoint_are_dropped(tmp_path):
  workdir = str(tmp_path / "w")
  config = tiny_config(**{"train.log_every": 1})
  train.train_and_evaluate(config, workdir)  # checkpoints 3 and 6, metrics at 1..6
  os.rename(os.path.join(workdir, "checkpoints", "6"), str(tmp_path / "six"))  # a crash at 6
  train.train_and_evaluate(config, workdir)  # resumes at 3: rows 4..6 written again
  steps = [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
           if "train_loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- two jobs, stops


def _wait_for(predicate, timeout_s: float = 600) -> bool:
  deadline = time.time() + timeout_s
  while time.time() < deadline and not predicate():
    time.sleep(0.05)
  return predicate()


def _train_rows(metrics) -> int:
  return sum("train_loss" in l for l in metrics.read_text().splitlines()) if metrics.exists() else 0


def test_a_paused_owner_keeps_its_lock_and_stops_without_writing_once_it_is_taken(tmp_path):
  """A real training job paused (SIGSTOP: Ctrl-Z, a frozen container) with a heartbeat older
  than the timeout keeps its workdir: its pid lives on this host. When another job takes the
  lock all the same (its file replaced), the owner, continued, writes nothing more and stops."""
  workdir = tmp_path / "w"
  lock, metrics = workdir / workdir_lib.LOCK_FILE, workdir / "metrics.jsonl"
  owner = _cli(workdir, "--config.train.num_steps=100000")
  try:
    assert _wait_for(lambda: _train_rows(metrics) >= 1), "the owner never trained"
    os.kill(owner.pid, signal.SIGSTOP)
    old = time.time() - workdir_lib.STALE_S - 60
    os.utime(lock, (old, old))  # no heartbeat for 11 minutes
    with pytest.raises(workdir_lib.WorkdirError,
                       match=rf"pid {owner.pid}, .*its process is alive, so the lock stays"):
      train.train_and_evaluate(tiny_config(), str(workdir))
    assert json.loads(lock.read_text())["pid"] == owner.pid  # still the owner's
    other = {"host": "elsewhere", "pid": 1, "started": "2026-12-03T00:00:00Z", "nonce": "other"}
    lock.write_text(json.dumps(other))  # a job the owner's host cannot see took it over
    rows, names = metrics.read_text(), sorted(os.listdir(workdir))
    os.kill(owner.pid, signal.SIGCONT)
    _, err = owner.communicate(timeout=600)
  finally:
    if owner.poll() is None:
      os.kill(owner.pid, signal.SIGCONT)
      owner.kill()
      owner.communicate()
  assert owner.returncode == 75, err[-3000:]  # not a mistake of the command: 2; not done: 0
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"resnet_ensemble: stopped: the lock {lock} is no longer this job's "
                         "(now: host elsewhere, pid 1"), last
  assert metrics.read_text() == rows and sorted(os.listdir(workdir)) == names  # nothing written
  assert json.loads(lock.read_text()) == other  # the new owner's lock is left alone


@pytest.mark.slow
def test_sigterm_outside_the_training_loop_says_what_it_stopped_and_releases_the_lock(tmp_path):
  """SIGTERM while the lesion study runs: one line naming it, exit 143, no lock left, no
  half-written result; the same command then finishes."""
  workdir = tmp_path / "w"
  first = _cli(workdir, "--config.train.num_steps=2")
  _, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  study = ("--mode=lesion", "--config.train.num_steps=2", "--config.lesion.draws=20",
           "--config.lesion.max_k=3")
  lesion_job = _cli(workdir, *study)
  lock = workdir / workdir_lib.LOCK_FILE
  assert _wait_for(lambda: lock.exists() or lesion_job.poll() is not None, 300)
  assert lesion_job.poll() is None, lesion_job.communicate()[1][-3000:]
  lesion_job.send_signal(signal.SIGTERM)
  _, err = lesion_job.communicate(timeout=600)
  assert lesion_job.returncode == 143, err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and re.fullmatch(
      r"resnet_ensemble: SIGTERM during --mode=lesion(: lesion)?: stopped; every file is "
      r"written whole, so what was written before is kept and nothing half-written is left, "
      r"and the workdir's lock is released. Rerun the same command to go on", lines[0]), lines
  assert not lock.exists() and not (workdir / "lesion.json").exists()
  again = _cli(workdir, *study)
  _, err = again.communicate(timeout=600)
  assert again.returncode == 0 and (workdir / "lesion.json").exists(), err[-3000:]


def test_an_empty_lock_left_by_a_failed_start_is_taken_over(tmp_path, capsys):
  workdir = tmp_path / "w"
  workdir.mkdir()
  lock = workdir / workdir_lib.LOCK_FILE
  lock.write_text("")
  old = time.time() - 60
  os.utime(lock, (old, old))
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 1}), str(workdir))
  assert "taking over the stale lock" in capsys.readouterr().out
  assert not lock.exists()


@pytest.fixture
def full_disk(tmp_path):
  """A real tmpfs of 64 KiB, filled to the last byte (mounting needs root: skipped without)."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
      while True:
        os.write(fd, b"\0" * 4096)
    except OSError:
      pass
    os.close(fd)
    yield disk
  finally:
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_at_start_names_the_lock_and_leaves_no_empty_lock(full_disk):
  workdir = full_disk / "w"
  with pytest.raises(workdir_lib.WorkdirError,
                     match=f"cannot write the lock {workdir / 'LOCK'}: No space left on device"):
    train.train_and_evaluate(tiny_config(), str(workdir))
  assert not (workdir / "LOCK").exists()  # an empty one would block the workdir
  os.remove(full_disk / "filler")
  with workdir_lib.lock(str(workdir)):  # the next start takes it
    assert json.loads((workdir / "LOCK").read_text())["pid"] == os.getpid()


def test_a_row_after_a_resume_between_log_steps_says_how_many_steps_it_averages(tmp_path, capsys):
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(), workdir)  # checkpoints 3 and 6, rows at 2, 4, 6
  os.rename(os.path.join(workdir, "checkpoints", "6"), str(tmp_path / "six"))  # a crash at 6
  capsys.readouterr()
  train.train_and_evaluate(tiny_config(), workdir)  # resumes at 3
  assert "the training row at step 4 averages the 1 steps since the resume" in (
      capsys.readouterr().out)
  rows = {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train_loss" in r}
  assert sorted(rows) == [2, 4, 6]
  assert rows[4]["train_steps"] == 1 and "train_steps" not in rows[2] | rows[6]


def test_a_stop_before_final_metrics_is_finished_by_mode_all_with_the_same_numbers(tmp_path):
  """A kill between the last checkpoint and final_metrics.json: --mode=all evaluates the
  checkpoint and writes it (the same numbers), and the report's command repeats the run's own
  settings (configs/run.py:WORKDIR), its train.num_steps too."""
  from resnet_ensemble import __main__ as cli
  workdir = str(tmp_path / "w")
  config = tiny_config(**{"train.num_steps": 4, **SMALL_STUDY})
  final = train.train_and_evaluate(config, workdir)
  os.remove(os.path.join(workdir, "final_metrics.json"))
  report.write_report(workdir)
  md = open(os.path.join(workdir, "report.md")).read()
  assert f"--config=configs/run.py:{workdir} --workdir={workdir}`" in md
  cli.run_mode("all", config, workdir)
  again = json.load(open(os.path.join(workdir, "final_metrics.json")))
  assert again == {"step": 4, **final}
  assert _checkpoints(workdir)[-1] == "4"


def test_damaged_json_names_its_file(tmp_path):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write('{"seed": ')
  from resnet_ensemble import config as config_lib
  with pytest.raises(ValueError, match=r"w/config.json is not valid JSON"):
    config_lib.from_workdir(workdir)
  with pytest.raises(workdir_lib.WorkdirError, match=r"w/config.json is not valid JSON"):
    workdir_lib.check_analysis(workdir, tiny_config())
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write('{"step": 1}\n{"step": 2,\n{"step": 3}\n{"step": 4, "tor')
  with pytest.raises(ValueError, match=r"w/metrics.jsonl, line 2, is not valid JSON"):
    read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write('{"step": 1}\n{"step": 2, "tor')  # a row torn by a crash: dropped, as on resume
  assert read_jsonl(os.path.join(workdir, "metrics.jsonl")) == [{"step": 1}]


def test_a_field_the_code_removed_neither_blocks_a_resume_nor_the_runs_own_config(tmp_path,
                                                                                 capsys):
  from resnet_ensemble import config as config_lib
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 3}), workdir)
  saved = workdir_lib.config_dict(tiny_config(**{"train.num_steps": 3}))
  saved["train"]["old_field"] = 7  # written by a version of the code that had it
  workdir_lib.guard_resume(workdir, tiny_config(), saved=saved)  # no difference to refuse
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  capsys.readouterr()
  config = config_lib.from_workdir(workdir)  # --config=configs/run.py:WORKDIR
  assert "train.old_field (ignored)" in capsys.readouterr().err
  assert config.train.num_steps == 3 and "old_field" not in config.train
  with pytest.raises(ValueError, match="seed: workdir has 0, this command has 1"):
    workdir_lib.guard_resume(workdir, tiny_config(**{"seed": 1}), saved=saved)
