#!/usr/bin/env bash
# Every benchmark in one call: the PyTorch reference and ours on the same machine, each step
# under its own timeout inside a total budget, every JSON line appended to $OUT/bench.jsonl as
# it is measured (a step cut by its timeout keeps the rows it finished), then the table
# (bench/table.py) printed and written to $OUT/table.md.
#
#   GPU host (~7 min on an H100):     bash bench/run_all.sh
#   offline GPU host (see launch/README.md):
#                                     launch/offline_gpu.sh run BUNDLE -- bash bench/run_all.sh
#   CPU smoke check (tiny sizes, ~1-2 min):  bash bench/run_all.sh --smoke   (or SMOKE=1)
#
# Environment: OUT (default /tmp/bench_out), BUDGET_S (seconds for all steps together; default
# 400 on the GPU), STEPS (a space-separated subset of the step names below, run in this order),
# PYTHON (default python3), TORCH_REF (the PyTorch side; default bench/torch_resnet.py),
# TORCH_COMPILE_MIN_S (60),
# JAX_COMPILATION_CACHE_DIR (default: a fresh temporary one; empty: no cache),
# STEP_CAP_S (seconds: replaces every step's own timeout; tests set it high, so a loaded machine
# cannot cut a step), KEEP=1 to append to an existing bench.jsonl, PROFILE_DIR=/tmp/prof to add a 'profile' row
# (bench/trace_summary.py: device kernels by time, busy vs idle) after each JAX measurement;
# keep it out of $OUT (the traces are many files; the rows carry the summary).
# Step names: torch_eager torch_compile (GPU only) train128 train1024 eval lesion paths
# train_effective train_sd (the core table: ~7.8 min on an H100) lesion_shared (E1/E3 with
# shared weights, beside the per-variant form of 'lesion') lesion_prefix (the suite from the
# intact network's shared prefix)
# train128_g8 train1024_g8 (train.conv_groups=8) train128_x4 train128_x2 (4 or 2 models at
# once, vmapped: a seed stack) train128_stream32 (model.stream_dtype=float32)
# train128_2proc (2 processes at once, concurrent.sh) paths_unpaired paths_chunk200
# train128_cmdbuf_off train128_cmdbuf_while train_effective_cmdbuf_while (GPU only)
# train_effective_multiply train_sd_multiply.
# PROFILE_GATED=1 also traces the gated steps (train_effective, train_sd).
set -uo pipefail  # not -e: a failing step must not stop the others
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    *) echo "unknown argument: $arg (the only one is --smoke)" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One persistent compilation cache for every step, fresh for each run: the host-side
# model.init (~7 s of compiling per process for ResNet-110) is compiled once per run. Whole
# programs only: XLA's autotune cache stays off, so each step's compile time is that of a fresh
# machine (only a program compiled by an earlier step, e.g. the 2-process copies of train128,
# is a hit; rows carry compile_cache).
if [ -z "${JAX_COMPILATION_CACHE_DIR+set}" ]; then
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d /tmp/jax_cache_bench.XXXXXX)
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=${JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES-none}
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
JSONL=$OUT/bench.jsonl
LOG=$OUT/bench.log
PY=${PYTHON:-python3}
TORCH_REF=${TORCH_REF:-bench/torch_resnet.py}
[ "${KEEP:-0}" = 1 ] || : > "$JSONL"

if [ "$SMOKE" = 1 ]; then
  # ResNet-20 width 8 on digit-shaped images; XLA at -O0 (these runs are compile-bound).
  export XLA_FLAGS=${XLA_FLAGS:---xla_backend_optimization_level=0}
  BUDGET_S=${BUDGET_S:-600}; MIN_S=5
  NET="--config=configs/quickstart.py --config.stack=()"  # one run, not the quickstart's stack
  EFFECTIVE="$NET --config.gates.sampler=effective --config.gates.k=5"
  SD="$NET --config.gates.sampler=stochastic_depth"
  TRAIN="--config.train.steps_per_call=2 --calls=2 --num_examples=500"
  B_SMALL=16; B_LARGE=64
  EVAL="--batch_sizes=50,100 --groups=1,2 --num_images=200 --calls=2"
  LESION="--num_images=100 --config.eval.batch_size=50 --chunk=4 --config.lesion.draws=2
    --config.lesion.max_k=2 --config.lesion.reorder_max_swaps=2 --config.lesion.reorder_draws=2
    --time_cap_s=5"
  PATHS="--config.paths.samples_per_k=4 --config.paths.chunk=12 --config.paths.batch_size=16
    --num_examples=200 --time_cap_s=5"
  TORCH="--smoke"
else
  # ResNet-110, bf16 (f32 BN statistics), fully unrolled: the settings the GPU runs use.
  BUDGET_S=${BUDGET_S:-400}; MIN_S=20
  FAST="--config.model.dtype=bfloat16 --config.model.unroll=0"
  NET="--config=configs/cifar10_resnet110.py $FAST"
  EFFECTIVE="--config=configs/cifar10_resnet110_effective.py $FAST"
  SD="--config=configs/cifar10_resnet110_sd.py $FAST"
  TRAIN="--config.train.steps_per_call=50 --calls=6 --time_cap_s=8"
  B_SMALL=128; B_LARGE=1024
  EVAL="--batch_sizes=10000 --groups=1,16 --num_images=10000 --calls=20 --time_cap_s=3"
  LESION="--num_images=10000 --chunk=64 --time_cap_s=5"
  PATHS="--time_cap_s=10"
  TORCH=""
  CMDBUF_ALL=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE
fi

start=$(date +%s)
status_row() {  # NAME STATUS RC WALL_S TIMEOUT_S
  printf '{"workload": "step", "step": "%s", "status": "%s", "rc": %d, "wall_s": %d, "timeout_s": %d}\n' \
    "$@" >> "$JSONL"
}

step() {  # step NAME CAP_S COMMAND...: runs COMMAND --out=$JSONL under min(CAP_S, budget left),
  # or skips it when that is under STEP_MIN_S (default MIN_S) seconds
  local name=$1 cap=${STEP_CAP_S:-$2}
  shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
  local left=$((BUDGET_S - ($(date +%s) - start)))
  local limit=$((cap < left ? cap : left)) min=${STEP_MIN_S:-$MIN_S}
  if ((limit < min)); then
    echo "== $name: skipped (${left} s of the ${BUDGET_S} s budget left)" | tee -a "$LOG"
    status_row "$name" skipped 0 0 0
    return 0
  fi
  echo "== $name (timeout ${limit} s): $*" | tee -a "$LOG"
  local err t0 rc
  err=$(mktemp)
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" --out="$JSONL" 2>"$err" | tee -a "$LOG" | grep -v '^{'
  rc=${PIPESTATUS[0]}
  grep -v '^I0000\|^WARNING: All log' "$err" >> "$LOG"
  local wall=$(($(date +%s) - t0)) status=ok
  if ((rc == 124 || rc == 137)); then
    status=timeout
    echo "   $name: timed out after ${wall} s (rows measured so far are kept)"
  elif ((rc != 0)); then
    status=failed
    echo "   $name: failed (exit $rc); its last stderr lines:"
    grep -v '^I0000\|^WARNING: All log' "$err" | tail -n 15
  fi
  rm -f "$err"
  status_row "$name" "$status" "$rc" "$wall" "$limit"
}

{
  echo "== bench/run_all.sh $(date -u +%FT%TZ) smoke=$SMOKE budget=${BUDGET_S}s"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} | tee -a "$LOG"

step torch_eager 60 "$PY" bench/torch_side.py --ref="$TORCH_REF" $TORCH --time_cap_s=40 \
  --rows=train128_fp32,train1024_bf16,eval,lesion_E1,paths_E6
if [ "$SMOKE" != 1 ]; then
  # torch.compile, the batch-1,024 reference: ~75 s of inductor compiling on an H100,
  # so second, where the budget cannot squeeze it out; not started with under 60 s left.
  STEP_MIN_S=${TORCH_COMPILE_MIN_S:-60} step torch_compile 150 "$PY" bench/torch_side.py \
    --ref="$TORCH_REF" --rows=compile1024
fi
PROF=${PROFILE_DIR:+--profile_dir=$PROFILE_DIR}
PROF_GATED=${PROFILE_GATED:+$PROF}
step train128 75 "$PY" bench/train_step.py $NET $TRAIN --config.train.batch_size=$B_SMALL $PROF
step train1024 80 "$PY" bench/train_step.py $NET $TRAIN --config.train.batch_size=$B_LARGE $PROF
step eval 70 "$PY" bench/eval_forward.py $NET $EVAL $PROF
# The lesion suite in the form lesion.variant_weights=auto picks on GPUs (per-variant weights,
# grouped convolutions); lesion_shared times E1/E3 with shared weights beside it.
step lesion 90 "$PY" bench/lesion_suite.py $NET $LESION --variant_weights=per_variant $PROF
step paths 60 "$PY" bench/path_sampling.py $NET $PATHS $PROF
step train_effective 70 "$PY" bench/train_step.py $EFFECTIVE $TRAIN --config.train.batch_size=$B_SMALL \
  $PROF_GATED
step train_sd 70 "$PY" bench/train_step.py $SD $TRAIN --config.train.batch_size=$B_SMALL $PROF_GATED
step lesion_shared 70 "$PY" bench/lesion_suite.py $NET $LESION --variant_weights=shared \
  --experiments=E1,E3
# The variants from the intact network's shared prefix (lesion.variant_weights=prefix, auto on
# the CPU): each variant runs only the blocks from its first change on, one after another.
step lesion_prefix 90 "$PY" bench/lesion_suite.py $NET $LESION --variant_weights=prefix
# The batch as 8 slices over 8 weight copies: grouped convolutions (train.conv_groups).
step train128_g8 70 "$PY" bench/train_step.py $NET $TRAIN --config.train.batch_size=$B_SMALL \
  --config.train.conv_groups=8 --variant=g8 $PROF
step train1024_g8 80 "$PY" bench/train_step.py $NET $TRAIN --config.train.batch_size=$B_LARGE \
  --config.train.conv_groups=8 --variant=g8
step train128_x4 90 "$PY" bench/train_step.py $NET $TRAIN --config.train.batch_size=$B_SMALL \
  --replicas=4
step train128_x2 80 "$PY" bench/train_step.py $NET $TRAIN --config.train.batch_size=$B_SMALL \
  --replicas=2
# bf16 branches, the identity path between blocks in float32 (model.stream_dtype).
step train128_stream32 70 "$PY" bench/train_step.py $NET $TRAIN --config.train.batch_size=$B_SMALL \
  --config.model.stream_dtype=float32 --variant=stream32
if [ "$SMOKE" != 1 ]; then
  # Is the batch-128 step bound by kernel launches? Command buffers (CUDA graphs) off, then
  # extended to the scan's while loop and conditionals (one graph per 50-step call).
  # Two training processes on the one GPU: do they fill each other's idle gaps?
  step train128_2proc 90 bash bench/concurrent.sh 2 50 "$PY" bench/train_step.py $NET $TRAIN \
    --config.train.batch_size=$B_SMALL
  # E6 with one path per routed backward (the pairs' baseline).
  step paths_unpaired 60 "$PY" bench/path_sampling.py $NET $PATHS --nopaired
  # 100 pairs per call instead of 25: fewer, larger kernels (the profile: 15 % idle, 5 us
  # median kernel).
  step paths_chunk200 60 "$PY" bench/path_sampling.py $NET $PATHS --config.paths.chunk=200 \
    --variant=chunk200
  step train128_cmdbuf_off 70 env XLA_FLAGS="--xla_gpu_enable_command_buffer=" \
    "$PY" bench/train_step.py $NET $TRAIN --config.train.batch_size=$B_SMALL --variant=cmdbuf_off
  step train128_cmdbuf_while 70 env XLA_FLAGS="--xla_gpu_enable_command_buffer=$CMDBUF_ALL" \
    "$PY" bench/train_step.py $NET $TRAIN --config.train.batch_size=$B_SMALL --variant=cmdbuf_while
  # Compute skipping runs a conditional per block: in a command buffer, no host round trip.
  step train_effective_cmdbuf_while 70 env XLA_FLAGS="--xla_gpu_enable_command_buffer=$CMDBUF_ALL" \
    "$PY" bench/train_step.py $EFFECTIVE $TRAIN --config.train.batch_size=$B_SMALL \
    --variant=cmdbuf_while
fi
step train_effective_multiply 70 "$PY" bench/train_step.py $EFFECTIVE $TRAIN \
  --config.train.batch_size=$B_SMALL --config.gates.skip_compute=False
step train_sd_multiply 70 "$PY" bench/train_step.py $SD $TRAIN \
  --config.train.batch_size=$B_SMALL --config.gates.skip_compute=False

echo "== table ($(($(date +%s) - start)) s of steps)"
"$PY" bench/table.py "$JSONL" | tee "$OUT/table.md"
