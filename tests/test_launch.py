"""launch/: tpu_vm.sh's gcloud command sequence (dry run, and a run against a fake gcloud),
gpu.sh's command, and the multi-process CPU launcher. Needs neither gcloud nor a GPU."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")
GPU = os.path.join(REPO, "launch", "gpu.sh")
MULTI = os.path.join(REPO, "launch", "multiprocess_cpu.py")

REQUIRED = {"name": "rn-test", "zone": "us-central2-b", "type": "v4-32",
            "config": "configs/quickstart.py", "workdir": "gs://bucket/runs/q"}


@pytest.fixture
def fake_bin(tmp_path):
  """A PATH directory whose gcloud / nvidia-smi log their argv (JSON lines) and do nothing.

  The fake gcloud prints ACTIVE for `describe`, copies scp's source into tmp/scp/, and exits
  with $FAKE_RUN_RC for the ssh command that runs the program."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.jsonl"
  (tmp_path / "scp").mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, shutil, sys
      args = sys.argv[1:]
      with open({str(log)!r}, "a") as f:
        f.write(json.dumps(["gcloud"] + args) + "\\n")
      if "describe" in args:
        print("ACTIVE")
      if "scp" in args:
        shutil.copy(args[args.index("scp") + 1], {str(tmp_path / "scp")!r})
      if "ssh" in args and any("resnet_ensemble" in a for a in args):
        sys.exit(int(os.environ.get("FAKE_RUN_RC", "0")))
      """))
  smi = bin_dir / "nvidia-smi"
  smi.write_text(f"#!/bin/sh\necho nvidia-smi \"$@\" >> {tmp_path / 'smi.log'}\nexit 9\n")
  for f in (gcloud, smi):
    f.chmod(0o755)

  def calls():
    if not log.exists():
      return []
    return [json.loads(line) for line in log.read_text().splitlines()]

  return bin_dir, calls


@pytest.fixture(scope="module")
def no_gcloud(tmp_path_factory):
  """A PATH directory whose gcloud fails: no test may reach the real one."""
  bin_dir = tmp_path_factory.mktemp("no_gcloud")
  (bin_dir / "gcloud").write_text("#!/bin/sh\necho 'test ran gcloud' >&2\nexit 99\n")
  (bin_dir / "gcloud").chmod(0o755)
  return bin_dir


@pytest.fixture(autouse=True)
def _guard(no_gcloud, monkeypatch):
  monkeypatch.setenv("PATH", f"{no_gcloud}{os.pathsep}{os.environ['PATH']}")


def run_script(script, *args, path_prefix=None, env=None):
  e = dict(os.environ, **(env or {}))
  if path_prefix:
    e["PATH"] = f"{path_prefix}{os.pathsep}{e['PATH']}"
  return subprocess.run(["bash", script, *map(str, args)], capture_output=True, text=True,
                        env=e, cwd=REPO, timeout=120)


def tpu_args(**overrides):
  values = {**REQUIRED, **overrides}
  return [a for k, v in values.items() if v is not None for a in (f"--{k}", v)]


def printed_commands(stdout):
  """The `+ ` lines as argv lists (shell comments dropped)."""
  return [shlex.split(line[2:], comments=True) for line in stdout.splitlines()
          if line.startswith("+ ")]


def gcloud_commands(stdout):
  return [c for c in printed_commands(stdout) if c[0] == "gcloud"]


def option(cmd, name):
  values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


def remote(cmd):
  return option(cmd, "command")


def check_run_command(cmd, mode="train", overrides=()):
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", REQUIRED["name"]]
  assert "--worker=all" in cmd and option(cmd, "zone") == REQUIRED["zone"]
  words = shlex.split(remote(cmd))
  assert "RESNET_ENSEMBLE_DISTRIBUTED=1" in words
  i = words.index("resnet_ensemble")
  assert words[i - 2:i] == ["python3", "-m"]
  program = words[i + 1:words.index("2>&1")] if "2>&1" in words else words[i + 1:]
  assert program == [f"--config={REQUIRED['config']}", f"--workdir={REQUIRED['workdir']}",
                     f"--mode={mode}", *overrides]


def test_tpu_vm_dry_run_sequence(fake_bin):
  bin_dir, calls = fake_bin
  proc = run_script(TPU_VM, *tpu_args(), "--config.train.num_steps=100",
                    "--config.model.dtype=bfloat16", "--dry-run", path_prefix=bin_dir)
  assert proc.returncode == 0, proc.stderr
  cmds = gcloud_commands(proc.stdout)
  verbs = [tuple(c[2:5]) for c in cmds]
  assert verbs == [("tpus", "tpu-vm", "create"), ("tpus", "tpu-vm", "scp"),
                   ("tpus", "tpu-vm", "ssh"), ("tpus", "tpu-vm", "ssh")], proc.stdout
  create, scp, install, run = cmds
  assert create[5] == REQUIRED["name"]
  assert option(create, "zone") == REQUIRED["zone"]
  assert option(create, "accelerator-type") == "v4-32"
  assert option(create, "version") == "tpu-ubuntu2204-base"
  assert not any(a.startswith("--project") for c in cmds for a in c)  # gcloud's default
  assert scp[6] == f"{REQUIRED['name']}:resnet-ensemble.tar.gz" and "--worker=all" in scp
  assert scp[5].endswith(".tar.gz")
  assert "--worker=all" in install
  assert "pip install -q -e '.[tfds]' 'jax[tpu]'" in remote(install)
  assert "tar -xzf resnet-ensemble.tar.gz" in remote(install)
  check_run_command(run, overrides=["--config.train.num_steps=100",
                                    "--config.model.dtype=bfloat16"])
  assert not any("delete" in c for c in cmds)  # the VM is kept unless --delete
  assert calls() == []  # a dry run runs no gcloud


def test_tpu_vm_options(fake_bin):
  bin_dir, calls = fake_bin
  proc = run_script(TPU_VM, *tpu_args(type="v5litepod-16"), "--project", "my-proj",
                    "--version=v2-alpha-tpuv5-lite", "--mode", "all", "--delete", "--dry-run",
                    "--", "--verbosity=1", path_prefix=bin_dir)
  assert proc.returncode == 0, proc.stderr
  cmds = gcloud_commands(proc.stdout)
  assert all(option(c, "project") == "my-proj" for c in cmds)
  assert option(cmds[0], "accelerator-type") == "v5litepod-16"
  assert option(cmds[0], "version") == "v2-alpha-tpuv5-lite"
  check_run_command(cmds[-2], mode="all", overrides=["--verbosity=1"])
  assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", REQUIRED["name"]]
  assert "--quiet" in cmds[-1]
  assert calls() == []


@pytest.mark.parametrize("flags,spot", [(["--queued"], False), (["--spot"], True),
                                        (["--queued", "--spot"], True)])
def test_tpu_vm_queued_resource(flags, spot):
  proc = run_script(TPU_VM, *tpu_args(), *flags, "--delete", "--dry-run")
  assert proc.returncode == 0, proc.stderr
  cmds = gcloud_commands(proc.stdout)
  create, describe = cmds[:2]
  assert create[2:6] == ["tpus", "queued-resources", "create", REQUIRED["name"]]
  assert option(create, "node-id") == REQUIRED["name"]
  assert option(create, "accelerator-type") == "v4-32"
  assert option(create, "runtime-version") == "tpu-ubuntu2204-base"
  assert ("--spot" in create) == spot
  assert describe[2:6] == ["tpus", "queued-resources", "describe", REQUIRED["name"]]
  assert [c[2:5] for c in cmds[2:5]] == [["tpus", "tpu-vm", "scp"], ["tpus", "tpu-vm", "ssh"],
                                         ["tpus", "tpu-vm", "ssh"]]
  check_run_command(cmds[4])
  assert cmds[5][2:6] == ["tpus", "queued-resources", "delete", REQUIRED["name"]]
  assert "--force" in cmds[5] and len(cmds) == 6


def test_tpu_vm_setup_runs_between_install_and_run():
  proc = run_script(TPU_VM, *tpu_args(), "--setup", "echo 'data ready'", "--dry-run")
  assert proc.returncode == 0, proc.stderr
  cmds = gcloud_commands(proc.stdout)
  assert len(cmds) == 5 and "pip install" in remote(cmds[2])
  assert "--worker=all" in cmds[3]
  assert remote(cmds[3]) == "cd ~/resnet-ensemble && echo 'data ready'"
  check_run_command(cmds[4])


def test_tpu_vm_no_create_no_install():
  proc = run_script(TPU_VM, *tpu_args(), "--no-create", "--no-install", "--dry-run")
  assert proc.returncode == 0, proc.stderr
  cmds = gcloud_commands(proc.stdout)
  assert len(cmds) == 1
  check_run_command(cmds[0])


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_tpu_vm_missing_argument(missing, fake_bin):
  bin_dir, calls = fake_bin
  proc = run_script(TPU_VM, *tpu_args(**{missing: None}), "--dry-run", path_prefix=bin_dir)
  assert proc.returncode == 2
  assert f"missing required argument --{missing}" in proc.stderr
  assert "usage:" in proc.stderr
  assert "+ gcloud" not in proc.stdout and calls() == []


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown argument: --bogus"),
    (["--config", "configs/nope.py"], "configs/nope.py: no such file"),
    (["--mode", "fly"], "--mode must be one of"),
    (["--zone"], "--zone needs a value"),
    (["--detach", "--delete"], "--detach and --delete"),
])
def test_tpu_vm_bad_arguments(args, message):
  base = [a for k, v in REQUIRED.items() if f"--{k}" not in args for a in (f"--{k}", v)]
  proc = run_script(TPU_VM, *base, *args, "--dry-run")
  assert proc.returncode == 2, proc.stdout
  assert message in proc.stderr


def test_tpu_vm_help():
  proc = run_script(TPU_VM, "--help")
  assert proc.returncode == 0 and "usage:" in proc.stdout and "--dry-run" in proc.stdout


@pytest.mark.parametrize("run_rc", [0, 3])
def test_tpu_vm_runs_printed_commands(fake_bin, tmp_path, run_rc):
  """Against a fake gcloud: the commands run are the ones the dry run prints, the code that
  reaches the workers is this checkout, a failed run fails the script and --delete still
  deletes the VM."""
  bin_dir, calls = fake_bin
  args = [*tpu_args(), "--spot", "--delete", "--config.train.num_steps=7"]
  dry = gcloud_commands(run_script(TPU_VM, *args, "--dry-run").stdout)
  proc = run_script(TPU_VM, *args, path_prefix=bin_dir, env={"FAKE_RUN_RC": str(run_rc)})
  assert proc.returncode == run_rc, proc.stderr
  ran = calls()
  assert len(ran) == len(dry) == 6
  for d, r in zip(dry, ran):
    if d[4] == "scp":  # the tarball lives in a fresh temporary directory on each run
      d, r = d[:5] + d[6:], r[:5] + r[6:]
    assert d == r
  with tarfile.open(tmp_path / "scp" / "resnet-ensemble.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"pyproject.toml", "configs/quickstart.py", "resnet_ensemble/__main__.py",
          "launch/tpu_vm.sh"} <= names
  assert not any(n.startswith((".venv/", ".git/")) for n in names)


def test_gpu_dry_run():
  proc = run_script(GPU, "--dry-run", "--install", "--gpus", "0,1",
                    "--config=configs/quickstart.py", "--workdir=runs/g",
                    "--config.model.dtype=bfloat16", "--config.model.unroll=0",
                    env={"PYTHON": "python3"})
  assert proc.returncode == 0, proc.stderr
  lines = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
  assert lines == [
      "export CUDA_VISIBLE_DEVICES=0,1",
      "python3 -m pip install -e . 'jax[cuda12]'",
      "python3 -m resnet_ensemble --config=configs/quickstart.py --workdir=runs/g "
      "--config.model.dtype=bfloat16 --config.model.unroll=0"]
  plain = run_script(GPU, "--dry-run", "--config=configs/quickstart.py", "--workdir=w",
                     env={"PYTHON": "python3"})
  assert plain.stdout.splitlines() == [
      "+ python3 -m resnet_ensemble --config=configs/quickstart.py --workdir=w"]


def test_gpu_without_gpu_fails_clearly(fake_bin):
  bin_dir, _ = fake_bin  # its nvidia-smi fails, as on a machine without a loaded driver
  proc = run_script(GPU, "--config=configs/quickstart.py", "--workdir=w", path_prefix=bin_dir)
  assert proc.returncode == 1
  assert "nvidia-smi sees no GPU" in proc.stderr
  assert run_script(GPU).returncode == 2


def multi(*args, timeout=120):
  return subprocess.run([sys.executable, MULTI, *map(str, args)], capture_output=True,
                        text=True, cwd=REPO, timeout=timeout,
                        env=dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0"))


def parse_launch(line):
  words = shlex.split(line[2:])
  env = dict(w.split("=", 1) for w in words[:3])
  return env, words[3:]


def test_multiprocess_cpu_dry_run():
  proc = multi("-n", 3, "-d", 2, "-p", 23456, "--dry-run", "--",
               "--config=configs/quickstart.py", "--workdir=runs/mp", "--config.seed=1")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 3 and all(line.startswith("+ ") for line in lines)
  for i, line in enumerate(lines):
    env, argv = parse_launch(line)
    assert env["JAX_PLATFORMS"] == "cpu"
    # Other XLA flags of the environment are kept.
    assert env["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=0",
                                        "--xla_force_host_platform_device_count=2"]
    assert argv == [sys.executable, "-m", "resnet_ensemble",
                    "--coordinator_address=localhost:23456", "--num_processes=3",
                    f"--process_id={i}", "--config=configs/quickstart.py",
                    "--workdir=runs/mp", "--config.seed=1"]


def test_multiprocess_cpu_dry_run_env():
  proc = multi("-n", 2, "--env", "--dry-run", "--", "--workdir=w")
  lines = proc.stdout.splitlines()
  assert len(lines) == 2
  addresses = set()
  for i, line in enumerate(lines):
    words = shlex.split(line[2:])
    env = dict(w.split("=", 1) for w in words if "=" in w and w.split("=")[0].isupper())
    assert env["JAX_PROCESS_ID"] == str(i) and env["JAX_NUM_PROCESSES"] == "2"
    assert "--xla_force_host_platform_device_count=1" in env["XLA_FLAGS"]
    addresses.add(env["JAX_COORDINATOR_ADDRESS"])
    assert words[-4:] == [sys.executable, "-m", "resnet_ensemble", "--workdir=w"]
  assert len(addresses) == 1 and addresses.pop().startswith("localhost:")


PROBE = """\
import os, sys, time
pid = int(os.environ["JAX_PROCESS_ID"])
print(f"hello from {pid}: {sys.argv[1:]}")
print(f"stderr of {pid}", file=sys.stderr)
if "--fail" in sys.argv and pid == 1:
  sys.exit(3)
if "--hang" in sys.argv and pid == 0:
  time.sleep(600)
"""


def test_multiprocess_cpu_prefixes_and_exit_codes(tmp_path):
  probe = tmp_path / "probe.py"
  probe.write_text(PROBE)
  ok = multi("-n", 3, "--env", "--script", probe, "--", "--x=1")
  assert ok.returncode == 0, ok.stderr
  for i in range(3):
    assert f"[p{i}] hello from {i}: ['--x=1']" in ok.stdout.splitlines()
    assert f"[p{i}] stderr of {i}" in ok.stdout.splitlines()
  failed = multi("-n", 3, "--env", "--script", probe, "--", "--fail")
  assert failed.returncode == 3 and "p1 exited with 3" in failed.stderr
  # A process left waiting (as in a collective) after another failed is stopped.
  hung = multi("-n", 2, "--env", "--grace", 1, "--script", probe, "--", "--fail", "--hang",
               timeout=60)
  assert hung.returncode == 3 and "p1 exited with 3" in hung.stderr


JAX_PROBE = """\
import os
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                           int(os.environ["JAX_NUM_PROCESSES"]),
                           int(os.environ["JAX_PROCESS_ID"]))
mesh = Mesh(np.array(jax.devices()), ("d",))
local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print(f"process {jax.process_index()}/{jax.process_count()}, "
      f"{jax.device_count()} devices, sum {float(total)}")
"""


@pytest.mark.slow
def test_multiprocess_cpu_joins_one_jax_runtime(tmp_path):
  """2 processes x 2 CPU devices form one 4-device runtime; a sum over it crosses processes."""
  probe = tmp_path / "jax_probe.py"
  probe.write_text(JAX_PROBE)
  proc = multi("-n", 2, "-d", 2, "--env", "--timeout", 100, "--script", probe)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for i in range(2):
    assert f"[p{i}] process {i}/2, 4 devices, sum 6.0" in proc.stdout.splitlines()


# --- offline_gpu.sh and reproduce_cifar10.sh -------------------------------------------------

OFFLINE = os.path.join(REPO, "launch", "offline_gpu.sh")
REPRODUCE = os.path.join(REPO, "launch", "reproduce_cifar10.sh")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


def _cpu_env(**extra) -> dict:
  """This interpreter first on PATH (the scripts call python3), JAX on the CPU."""
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, PYTHON=sys.executable,
              PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **extra)


def _bash(script, *args, cwd, env=None, timeout=600):
  return subprocess.run(["bash", script, *map(str, args)], cwd=cwd, env=env or _cpu_env(),
                        capture_output=True, text=True, timeout=timeout)


def _pinned(name: str) -> str:
  with open(os.path.join(REPO, "constraints.txt")) as f:
    return next(line.strip() for line in f if line.lower().startswith(f"{name}=="))


def test_offline_bundle_dry_run(tmp_path):
  data = tmp_path / "cifar"
  (data / "cifar-10-batches-bin").mkdir(parents=True)
  proc = _bash(OFFLINE, "bundle", tmp_path / "b", "--package", "etils==1.15.0", "--data", data,
               "--file", QUICKSTART, "--setup", "echo ready", "--dry-run", cwd=tmp_path,
               env=dict(os.environ, PYTHON="python3"))
  assert proc.returncode == 0, proc.stderr
  cmds = printed_commands(proc.stdout)
  download = next(c for c in cmds if c[:4] == ["python3", "-m", "pip", "download"])
  # Wheels for the host's Python and platform, no dependencies, the CI versions by default.
  assert {"--no-deps", "--only-binary=:all:"} <= set(download)
  assert download[download.index("--python-version") + 1] == "3.12"
  assert download[download.index("-d") + 1] == f"{tmp_path}/b/wheels"
  assert download[-3:] == [_pinned("ml_collections"), _pinned("clu"), "etils==1.15.0"]
  assert ["cp", "-R", f"{data}/.", f"{tmp_path}/b/data/"] in cmds
  assert ["cp", QUICKSTART, f"{tmp_path}/b/"] in cmds
  assert not (tmp_path / "b").exists()  # a dry run makes nothing


@pytest.mark.parametrize("args,message", [
    ([], "needs a BUNDLE"),
    (["fly", "b"], "unknown command fly"),
    (["bundle", "b", "--data", "/no/such/dir"], "--data /no/such/dir: no such directory"),
    (["run", "b", "--", "true"], "b: no such bundle directory"),
    (["run", ".", "--budget", "ten", "--", "true"], "--budget ten"),
    (["run", "."], "no command after --"),
])
def test_offline_bad_arguments(args, message, tmp_path):
  proc = _bash(OFFLINE, *(args or ["run"]), cwd=tmp_path)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_offline_run_installs_sets_up_once_and_runs(tmp_path):
  """run: the bundle's setup.sh once, the checkout and BUNDLE/site on PYTHONPATH, the
  command's exit status passed on; --budget stops the command with SIGINT."""
  bundle = tmp_path / "my bundle"
  bundle.mkdir()
  (bundle / "setup.sh").write_text("echo set up >> count.txt\n")
  probe = ("import os, resnet_ensemble, sys; print('bundle', os.environ['OFFLINE_BUNDLE']); "
           "print('package', resnet_ensemble.__file__); sys.exit(int(sys.argv[1]))")
  for rc in (0, 5):
    proc = _bash(OFFLINE, "run", bundle, "--", sys.executable, "-c", probe, rc, cwd=tmp_path)
    assert proc.returncode == rc, proc.stderr
    assert f"bundle {bundle}" in proc.stdout
    assert f"package {REPO}/resnet_ensemble/__init__.py" in proc.stdout
  assert (bundle / "count.txt").read_text() == "set up\n"
  proc = _bash(OFFLINE, "run", bundle, "--budget", "1", "--", "sleep", "30", cwd=tmp_path)
  assert proc.returncode == 124


@pytest.mark.slow
def test_offline_run_packs_runs_and_resumes_them_on_a_fresh_host(tmp_path):
  """--runs: every run under DIR is packed after the command (a mixed stack run by run, as
  NAME--RUN); carried back in BUNDLE/resume/, the packs are unpacked into their runs, which
  resume; a pack for a run that has checkpoints already is left alone."""
  bundle = tmp_path / "my bundle"
  bundle.mkdir()
  overrides = ['--config.stack=("e8:gates.sampler=effective,gates.k=2,'
               'gates.keep_downsampling=false","seed1:seed=1")', "--config.model.depth=8",
               "--config.train.eval_every=5", "--config.checkpoint.every=5",
               "--config.train.log_every=5"]

  def train(steps: int, *more: str) -> str:
    proc = _bash(OFFLINE, "run", bundle, "--runs", "runs", "--out", tmp_path / "out dir",
                 *more, "--", sys.executable, "-m", "resnet_ensemble", f"--config={QUICKSTART}",
                 "--workdir=runs/st", *overrides, f"--config.train.num_steps={steps}",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout

  train(5)
  # Files beside the checkpoints (an analysis' JSON) travel too; a lock does not.
  (tmp_path / "runs" / "st" / "e8" / "lesion.json").write_text("{}")
  (tmp_path / "runs" / "st" / "e8" / "LOCK").write_text("{}")
  assert _bash(OFFLINE, "run", bundle, "--runs", "runs", "--out", tmp_path / "out dir", "--",
               "true", cwd=tmp_path).returncode == 0
  with tarfile.open(tmp_path / "out dir" / "st--e8.tar.part-aa") as tar:
    assert "lesion.json" in tar.getnames() and "LOCK" not in tar.getnames()
  packs = sorted(os.listdir(tmp_path / "out dir"))
  assert packs == ["st--e8.tar.part-aa", "st--seed1.tar.part-aa"]
  for pack in packs:
    with tarfile.open(tmp_path / "out dir" / pack) as tar:
      assert {"config.json", "final_metrics.json", "checkpoints/5"} <= set(tar.getnames())
  shutil.rmtree(tmp_path / "runs")  # a fresh host: only the carried packs
  shutil.move(tmp_path / "out dir", bundle / "resume")
  out = train(10)
  assert out.count("resume: unpacked step 5 of runs/st/") == 2
  assert "resumed from runs/st at step 5" in out
  assert (tmp_path / "runs" / "st" / "e8" / "lesion.json").read_text() == "{}"
  for run in ("e8", "seed1"):
    with tarfile.open(tmp_path / "out dir" / f"st--{run}.tar.part-aa") as tar:
      assert "checkpoints/10" in tar.getnames() and "checkpoints/5" not in tar.getnames()
  # The runs are there now: the carried step-5 packs must not replace their checkpoints.
  out = _bash(OFFLINE, "run", bundle, "--runs", "runs", "--dry-run", "--", "true",
              cwd=tmp_path).stdout
  assert "runs/st/e8 has checkpoints already" in out and "+ unpack_run" not in out


def _truncated_pack(path, tmp_path):
  """A pack cut off mid-way, as a failed copy leaves it: a newer checkpoint that tar starts
  extracting, then hits the end of the file."""
  src = tmp_path / "pack_src"
  (src / "checkpoints" / "10").mkdir(parents=True)
  (src / "checkpoints" / "10" / "state").write_bytes(os.urandom(200_000))
  (src / "config.json").write_text(json.dumps({"train": {"num_steps": 10}}))
  whole = tmp_path / "whole.tar"
  with tarfile.open(whole, "w") as tar:
    for name in ("config.json", "checkpoints"):
      tar.add(src / name, arcname=name)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(whole.read_bytes()[:120_000])


def _old_run(run_dir):
  """A run directory holding checkpoint 5, the one a bad pack must not cost."""
  (run_dir / "checkpoints" / "5").mkdir(parents=True)
  (run_dir / "checkpoints" / "5" / "state").write_text("step 5")
  (run_dir / "config.json").write_text(json.dumps({"train": {"num_steps": 10}}))


def test_a_corrupt_pack_leaves_the_runs_checkpoints_in_place(tmp_path):
  """unpack_run replaces RUN/checkpoints only once the whole pack has unpacked."""
  home = tmp_path / "my home"
  _old_run(home / "runs" / "r")
  _truncated_pack(tmp_path / "files at" / "r.tar.part-aa", tmp_path)
  proc = subprocess.run(
      ["bash", "-c", f'source {shlex.quote(os.path.join(REPO, "launch", "runpack.sh"))} && '
       'unpack_run runs/r "$1"', "_", str(tmp_path / "files at" / "r.tar.part-aa")],
      cwd=home, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0, proc.stdout
  assert "r.tar.part-aa" in proc.stderr and "runs/r left as it was" in proc.stderr
  assert (home / "runs" / "r" / "checkpoints" / "5" / "state").read_text() == "step 5"
  assert [p.name for p in (home / "runs" / "r" / "checkpoints").iterdir()] == ["5"]
  assert json.loads((home / "runs" / "r" / "config.json").read_text())["train"]["num_steps"] == 10
  assert sorted(os.listdir(home / "runs")) == ["r"]  # no half-unpacked directory left behind


def test_a_corrupt_resume_pack_stops_before_the_command(tmp_path):
  """Unpacked half-way, a resume pack would leave no usable checkpoint and the run would
  train again from step 0: offline_gpu.sh stops with an error instead, the run as it was."""
  bundle = tmp_path / "my bundle"
  _truncated_pack(bundle / "resume" / "st--e8.tar.part-aa", tmp_path)
  proc = _bash(OFFLINE, "run", bundle, "--runs", "runs", "--", "touch", tmp_path / "ran",
               cwd=tmp_path)
  assert proc.returncode == 1, proc.stdout
  assert "st--e8.tar.part-aa is not a whole tar" in proc.stderr
  assert not (tmp_path / "ran").exists()
  assert os.listdir(tmp_path / "runs") == ["st"] and os.listdir(tmp_path / "runs" / "st") == []


def _stages(stdout: str) -> dict[str, list[str]]:
  """reproduce_cifar10.sh's printed commands by stage: {stage: argv after the timeout}."""
  out, stage = {}, None
  for line in stdout.splitlines():
    if line.startswith("[") and ": budget " in line:
      stage = line.split("] ", 1)[1].split(":")[0]
    elif line.startswith("+ "):
      words = shlex.split(line[2:])
      assert words[:3] == ["timeout", "-s", "INT"], line
      out[stage] = words[3:]
  return out


def test_reproduce_dry_run_prints_the_whole_paper(tmp_path):
  proc = _bash(REPRODUCE, "--dry-run", "--runs", tmp_path / "r", "--data", "/data/c10",
               "--budget", "paths=900", cwd=tmp_path, env=dict(_cpu_env(), PYTHON="python3"))
  assert proc.returncode == 0, proc.stderr
  stages = _stages(proc.stdout)
  assert list(stages) == ["r110", "vgg", "stack", "lesion_r110", "lesion_vgg", "lesion_sd",
                          "paths", "report"]
  budgets = {s: int(argv[0]) for s, argv in stages.items()}
  assert budgets["r110"] == 1500 and budgets["paths"] == 900 and budgets["stack"] == 5400
  argv = {s: a[1:] for s, a in stages.items()}
  r110, stack = f"{tmp_path}/r/resnet110_seed0", f"{tmp_path}/r/r110_stack"
  assert argv["r110"][:5] == ["python3", "-m", "resnet_ensemble",
                              "--config=configs/cifar10_resnet110.py", f"--workdir={r110}"]
  assert "--config.data.dir=/data/c10" in argv["r110"] and "--mode=train" in argv["r110"]
  assert option(argv["vgg"], "config") == "configs/cifar10_vgg15.py"
  # One program for E8, E10's stochastic depth and seeds 1 and 2, in float32 (the last
  # dtype on the command line is the one that counts).
  assert option(argv["stack"], "workdir") == stack
  assert option(argv["stack"], "config.stack") == (
      '("e8:gates.sampler=effective,gates.k=23","sd:gates.sampler=stochastic_depth,'
      'gates.p_last=0.5,gates.keep_downsampling=false","seed1:seed=1","seed2:seed=2")')
  dtypes = [a for a in argv["stack"] if a.startswith("--config.model.dtype=")]
  assert dtypes[-1] == "--config.model.dtype=float32"
  assert option(argv["lesion_sd"], "config") == f"configs/run.py:{stack}/sd"
  assert "--config.lesion.max_k=0" in argv["lesion_sd"] and "--mode=lesion" in argv["lesion_sd"]
  assert "--config.lesion.max_k=0" not in argv["lesion_r110"]  # E1, E3 and E4
  assert option(argv["paths"], "config.paths.samples_per_k") == "1000"
  assert option(argv["report"], "config.report.seed_workdirs") == f"{stack}/seed1,{stack}/seed2"
  assert option(argv["report"], "config.report.sd_workdir") == f"{stack}/sd"
  assert option(argv["report"], "config.report.effective_workdir") == f"{stack}/e8"
  assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,message", [
    (["--only", "r110,fly"], "--only: no stage fly"),
    (["--budget", "fly=3"], "no stage fly"),
    (["--budget", "r110"], "expected STAGE=SECONDS"),
    (["--bogus"], "unknown argument: --bogus"),
])
def test_reproduce_bad_arguments(args, message, tmp_path):
  proc = _bash(REPRODUCE, *args, "--dry-run", cwd=tmp_path)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.slow
def test_reproduce_resumes_skips_what_is_done_and_waits_for_unfinished_runs(tmp_path):
  """The two stages r110 and paths: a budget too short leaves the run unfinished (exit 3, E6
  waits for it); the next call trains it (a tiny ResNet on the digits) and runs E6;
  a third call skips both; asking for more paths per length runs E6 again."""
  env = _cpu_env(CONFIG_R110=QUICKSTART, E6_PATHS="2",
                 FAST="--config.stack=() --config.model.depth=8 --config.model.width=4 --config.train.num_steps=4",
                 CADENCE="--config.train.eval_every=4 --config.checkpoint.every=2")
  runs = tmp_path / "runs"

  def reproduce(*args):
    return _bash(REPRODUCE, "--runs", runs, "--only", "r110,paths", *args, cwd=tmp_path, env=env)

  # A training that outlives its budget (a stand-in python that sleeps when it is asked to
  # run the package, and is python otherwise, for the done checks).
  slow = tmp_path / "slow_python"
  slow.write_text(f'#!/bin/sh\ncase "$*" in *"-m resnet_ensemble"*) exec sleep 60;; esac\n'
                  f'exec {shlex.quote(sys.executable)} "$@"\n')
  slow.chmod(0o755)
  env["PYTHON"] = str(slow)
  cut = reproduce("--budget", "r110=1")
  env["PYTHON"] = sys.executable
  assert cut.returncode == 3, cut.stdout + cut.stderr
  assert "r110: out of its 1s budget" in cut.stdout
  assert f"paths: waits for {runs}/resnet110_seed0" in cut.stdout
  assert not (runs / "resnet110_seed0" / "gradients.json").exists()
  whole = reproduce()
  assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-2000:]
  assert "r110: finished" in whole.stdout and "paths: finished" in whole.stdout
  paths = json.loads((runs / "resnet110_seed0" / "gradients.json").read_text())
  assert paths["gradient"]["samples_per_k"] == 2 and paths["checkpoint_step"] == 4
  again = reproduce()
  assert again.returncode == 0
  assert "r110: done, skipped" in again.stdout and "paths: done, skipped" in again.stdout
  assert "+ timeout" not in again.stdout
  env["E6_PATHS"] = "4"
  more = reproduce()
  assert "r110: done, skipped" in more.stdout and "paths: finished" in more.stdout
  assert json.loads((runs / "resnet110_seed0" / "gradients.json").read_text())[
      "gradient"]["samples_per_k"] == 4
