#!/usr/bin/env python3
"""Starts N local processes of ``python -m resnet_ensemble`` joined by jax.distributed (CPU).

    python launch/multiprocess_cpu.py -n 2 -d 2 [-p PORT] [--dry-run] -- \\
        --config=configs/quickstart.py --workdir=runs/mp --config.train.num_steps=20

Each process i gets ``JAX_PLATFORMS=cpu``,
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (other XLA flags already in the
environment are kept) and ``--coordinator_address=localhost:PORT --num_processes=N
--process_id=i`` (or, with ``--env``, the same as ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), so the N processes form one JAX runtime with N*D
CPU devices: the multi-host code paths of a TPU pod slice, on one machine. Every output line of
process i is printed prefixed with ``[p{i}]``. The launcher waits for all of them and exits with
0 if all succeeded, else with the first failure's code (128+signal for a signal). After a
failure the others get ``--grace`` seconds to finish (they may be blocked in a collective),
then SIGTERM, then SIGKILL. SIGINT/SIGTERM sent to the launcher are forwarded to all processes
(SIGTERM is what a preempted VM gets). ``--script FILE`` runs ``python FILE`` instead of
``python -m resnet_ensemble`` (e.g. a test probe).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog="multiprocess_cpu.py",
      description=__doc__.split("\n\n")[0],
      usage="%(prog)s [-n N] [-d D] [-p PORT] [--env] [--script FILE] [--dry-run] -- ARGS...")
  p.add_argument("-n", "--num-processes", type=int, default=2, metavar="N",
                 help="number of processes (default 2)")
  p.add_argument("-d", "--devices", type=int, default=1, metavar="D",
                 help="CPU devices per process (default 1)")
  p.add_argument("-p", "--port", type=int, default=0,
                 help="coordinator port on localhost (default: a free one)")
  p.add_argument("--env", action="store_true",
                 help="pass the coordinator as JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                      "JAX_PROCESS_ID instead of flags")
  p.add_argument("--script", metavar="FILE",
                 help="run `python FILE ARGS` instead of `python -m resnet_ensemble ARGS`")
  p.add_argument("--grace", type=float, default=20.0,
                 help="seconds the others may run on after one failed (default 20)")
  p.add_argument("--timeout", type=float, default=0.0,
                 help="stop all processes after this many seconds, exit 124 (default: none)")
  p.add_argument("--dry-run", action="store_true",
                 help="print the N commands (prefixed '+ ') and exit")
  p.add_argument("program_args", nargs=argparse.REMAINDER,
                 help="after --: the program's arguments")
  args = p.parse_args(argv)
  if args.program_args and args.program_args[0] == "--":
    args.program_args = args.program_args[1:]
  if args.num_processes < 1 or args.devices < 1:
    p.error("-n and -d must be at least 1")
  return args


def commands(args, port: int):
  """(env additions, argv) for each process id."""
  xla_flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", "")).split()
  xla_flags = " ".join(xla_flags + [f"{DEVICE_COUNT_FLAG}={args.devices}"])
  program = [sys.executable] + ([args.script] if args.script else ["-m", "resnet_ensemble"])
  address = f"localhost:{port}"
  out = []
  for i in range(args.num_processes):
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags, "PYTHONUNBUFFERED": "1"}
    if args.env:
      env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(args.num_processes),
                 JAX_PROCESS_ID=str(i))
      argv = program + args.program_args
    else:
      argv = program + [f"--coordinator_address={address}",
                        f"--num_processes={args.num_processes}", f"--process_id={i}",
                        *args.program_args]
    out.append((env, argv))
  return out


def format_command(env, argv) -> str:
  return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.join(argv)])


def exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  port = args.port or free_port()
  cmds = commands(args, port)
  if args.dry_run:
    for env, cmd in cmds:
      print("+ " + format_command(env, cmd))
    return 0

  lock = threading.Lock()
  procs = []

  def pump(i, stream):
    for line in iter(stream.readline, ""):
      with lock:
        sys.stdout.write(f"[p{i}] {line if line.endswith(chr(10)) else line + chr(10)}")
        sys.stdout.flush()
    stream.close()

  def forward(signum, _frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  old_handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  threads = []
  try:
    for i, (env, cmd) in enumerate(cmds):
      p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                           errors="replace", bufsize=1, start_new_session=True)
      procs.append(p)
      t = threading.Thread(target=pump, args=(i, p.stdout), daemon=True)
      t.start()
      threads.append(t)

    start = time.monotonic()
    first_failure = None   # (process id, exit code)
    failed_at = None
    stage = 0              # 0: waiting, 1: SIGTERM sent, 2: SIGKILL sent
    while any(p.poll() is None for p in procs):
      now = time.monotonic()
      for i, p in enumerate(procs):
        if first_failure is None and p.poll() not in (None, 0):
          first_failure, failed_at = (i, exit_code(p.returncode)), now
          print(f"multiprocess_cpu: p{i} exited with {first_failure[1]}", file=sys.stderr)
      if args.timeout and now - start > args.timeout and first_failure is None:
        first_failure, failed_at = (None, 124), now - args.grace
        print(f"multiprocess_cpu: timeout after {args.timeout:g} s", file=sys.stderr)
      if failed_at is not None and stage < 2 and now - failed_at > args.grace * (stage + 1):
        sig = signal.SIGTERM if stage == 0 else signal.SIGKILL
        for p in procs:
          if p.poll() is None:
            p.send_signal(sig)
        stage += 1
      time.sleep(0.05)
    for t in threads:
      t.join(timeout=5)
    if first_failure is None:
      for i, p in enumerate(procs):
        if p.returncode != 0:
          first_failure = (i, exit_code(p.returncode))
          print(f"multiprocess_cpu: p{i} exited with {first_failure[1]}", file=sys.stderr)
          break
    return 0 if first_failure is None else first_failure[1]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for s, h in old_handlers.items():
      signal.signal(s, h)


if __name__ == "__main__":
  sys.exit(main())
