#!/usr/bin/env bash
# N copies of one bench command at once on the same device, their timed windows aligned:
# does a launch-bound step leave the GPU idle enough for a second training process to fill it?
# (If so, two runs, e.g. E8 and stochastic depth, share one device for the price of ~one.)
#
#   bash bench/concurrent.sh N DELAY_S python3 bench/train_step.py ... [--out=...]
#
# Each copy gets --variant=<N>proc and --start_at=<now + DELAY_S> (after compiling and a
# warm-up it waits for that moment, then times), and 0.9/N of the device memory.
set -uo pipefail
n=${1:?usage: concurrent.sh N DELAY_S COMMAND...}
delay=${2:?usage: concurrent.sh N DELAY_S COMMAND...}
shift 2
start=$(python3 -c "import time; print(round(time.time() + $delay, 3))")
export XLA_PYTHON_CLIENT_MEM_FRACTION
XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / $n, 3))")
pids=()
trap 'kill "${pids[@]}" 2>/dev/null' TERM INT
for _ in $(seq 1 "$n"); do
  "$@" --variant="${n}proc" --start_at="$start" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit "$rc"
