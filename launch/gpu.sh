#!/usr/bin/env bash
# Runs resnet_ensemble on this machine's NVIDIA GPUs.
#
#   launch/gpu.sh [--install] [--gpus 0,1] [--dry-run] PROGRAM_ARGS...
#   launch/gpu.sh --install --config=configs/cifar10_resnet110.py --workdir=runs/r110 \
#       --config.data.dir=~/.cache/cifar10 --config.model.dtype=bfloat16 --config.model.unroll=0
#
# One process drives every visible GPU of the host: the mesh spans them all and each batch is
# split across them, so several GPUs need nothing special. Several GPU hosts: run this script
# on each host with the multi-host flags (the same coordinator on all, process ids 0..K-1):
#   launch/gpu.sh --coordinator_address=HOST0:1234 --num_processes=K --process_id=I ARGS...
#
# Options (before the program arguments; everything else goes to the program unchanged):
#   --install     first pip install -e . "jax[cuda12]" into the current Python environment
#   --gpus LIST   restrict to these GPUs (sets CUDA_VISIBLE_DEVICES), e.g. --gpus 0,1
#   --dry-run     print the commands (prefixed "+ ") instead of running them
#   -h, --help    this message
# Environment: PYTHON (default python3). XLA's defaults are kept: JAX preallocates 75 % of
# each GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION); set it yourself to share a GPU.
# Speed: --config.model.dtype=bfloat16 (compute in bfloat16, params and BatchNorm statistics
# stay float32) and --config.model.unroll=0 (fully unrolled block scans: longer compile,
# faster steps); --config.train.steps_per_call=20 runs 20 steps per dispatch.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
install=0 dry_run=0 gpus=""

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --install) install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --gpus) [ $# -ge 2 ] || { echo "gpu.sh: error: --gpus needs a value" >&2; exit 2; }
            gpus=$2; shift 2 ;;
    --gpus=*) gpus=${1#*=}; shift ;;
    *) break ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "gpu.sh: error: no program arguments (at least --config=... --workdir=...); see --help" >&2
  exit 2
fi

# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"
run() {
  echo "+ $(quote_all "$@")"
  [ "$dry_run" = 1 ] || "$@"
}

cd "$REPO"
if [ -n "$gpus" ]; then
  export CUDA_VISIBLE_DEVICES=$gpus
  echo "+ export CUDA_VISIBLE_DEVICES=$gpus"
fi
if [ "$dry_run" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu.sh: error: nvidia-smi not found: no NVIDIA driver on this machine" >&2
    exit 1
  fi
  if ! nvidia-smi -L; then
    echo "gpu.sh: error: nvidia-smi sees no GPU (driver not loaded?)" >&2
    exit 1
  fi
fi
if [ "$install" = 1 ]; then
  run "$PYTHON" -m pip install -e . "jax[cuda12]"
fi
export PYTHONUNBUFFERED=1
if [ "$dry_run" = 0 ]; then
  # Fail early, and clearly, when JAX cannot use the GPUs (e.g. jax without its CUDA plugin).
  "$PYTHON" -c 'import jax, sys
d = jax.devices()
print(f"jax {jax.__version__}: {len(d)} x {d[0].device_kind} ({d[0].platform})")
sys.exit(0 if d[0].platform == "gpu" else "gpu.sh: error: JAX sees no GPU; install jax[cuda12] (--install)")'
fi
echo "+ $(quote_all "$PYTHON" -m resnet_ensemble "$@")"
[ "$dry_run" = 1 ] || exec "$PYTHON" -m resnet_ensemble "$@"
