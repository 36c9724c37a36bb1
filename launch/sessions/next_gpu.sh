#!/usr/bin/env bash
# The next lent-GPU session: two calls (device tool, carry [".gpu"]), every result in $OUT as
# soon as it exists (the tool returns at most 8 files per call).
#
#   call 1, issue 6 (timeout_s 540):  bash launch/sessions/next_gpu.sh bench 500
#     the issue's rows in one call (<= 8 min), torch.compile included, the plain JAX
#     measurements followed by a traced call (profile rows: kernels per step, busy vs idle),
#     eval plain and as 16 convolution groups, the lesion suite with per-variant weights; the
#     steps run by EXTRA_STEPS in call 2 are left out -> bench.jsonl, bench.log, table.md,
#     session.log
#   call 2, issue 7 (timeout_s = what is left - 20):  bash launch/sessions/next_gpu.sh rest S
#     optional EXTRA_STEPS first (bench steps, e.g. EXTRA_STEPS="train128_x4 train128_2proc",
#     EXTRA_BUDGET_S=180), optional LESION=1 (the lesion study of $R, resumable), then the
#     training QUEUE for the rest of S seconds: one job per line, CONFIG WORKDIR [overrides],
#     each resumed (from .gpu/resume/ packs) and given all the time left; the next job starts
#     only when one finishes with more than 90 s to spare. Default: E8 (effective paths), then
#     stochastic depth (E10's model, multiply form), then seeds 1 and 2 of the paper's recipe
#     as one stack, in float32 (the paper's precision: the bf16 question of the ResNet-110 gap;
#     the later --config.model.dtype wins over $O's bfloat16). SECOND_RUN=runs/r110_sd_s0 trains a second run (SECOND_CONFIG, default
#     stochastic depth; SECOND_O: its own extra overrides, e.g. --config.seed=1) in a second
#     process beside the queue, each with 0.45 of the memory (drop that job from QUEUE).
#     STACK=1: the queue is instead ONE mixed stack of the paper's ResNet-110, one vmapped
#     program in float32 (the paper's precision): E8 (effective paths, k = 23; run e8), E10's
#     stochastic depth (p_L = 0.5, every block droppable; run sd), both seed 0, and seeds 1 and 2
#     of the plain recipe (seed1, seed2), each in runs/r110_mixed/RUN with its own config.json,
#     packed as r110_mixed_RUN (publish_run.sh takes that name; configs/run.py:runs/r110_mixed/RUN
#     is its config). E8 starts from step 0: its step-22,750 pack is not in this checkout.
#     Carry: four packs of ~13 MB and the ~20 MB of data and wheels exceed the 64 MiB limit, so
#     a stack that must resume on a fresh machine from carried packs holds three runs
#     (STACK_RUNS). STACK_CONFIG, STACK_DIR, STACK_RUNS (the --config.stack value, no spaces).
#
# CPU smoke: SMOKE=1 bash launch/sessions/next_gpu.sh bench 600
#            SMOKE=1 R=<trained quickstart workdir> CONFIG_R=configs/quickstart.py LESION=1 \
#              CONFIG_E=configs/quickstart.py E_RUN=/tmp/qs_eff O="" E_O="--config.gates.sampler=effective \
#              --config.gates.k=5 --config.train.num_steps=40" bash launch/sessions/next_gpu.sh rest 200
#            SMOKE=1 STACK=1 STACK_CONFIG=configs/quickstart.py STACK_DIR=/tmp/mixed O="" \
#              STACK_RUNS='("e8:gates.sampler=effective,gates.k=2,gates.keep_downsampling=false","sd:gates.sampler=stochastic_depth","seed1:seed=1","seed2:seed=2")' \
#              E_O="--config.model.depth=8 --config.model.width=4 --config.train.num_steps=6 \
#              --config.train.eval_every=3 --config.checkpoint.every=3" \
#              bash launch/sessions/next_gpu.sh rest 200
set -o pipefail
STAGE=${1:?usage: next_gpu.sh bench|rest SECONDS}
TOTAL=${2:-520}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=${R:-results/cifar10/resnet110_seed0}
CONFIG_R=${CONFIG_R:-configs/cifar10_resnet110.py}
CONFIG_E=${CONFIG_E:-configs/cifar10_resnet110_effective.py}
E_RUN=${E_RUN:-runs/r110_eff_s0}  # E8's workdir (resumed from .gpu/resume/<its name>.tar.part-*)
SECOND_CONFIG=${SECOND_CONFIG:-configs/cifar10_resnet110_sd.py}  # with SECOND_RUN: at once
QUEUE=${QUEUE-"$CONFIG_E $E_RUN
configs/cifar10_resnet110_sd.py runs/r110_sd_s0 --config.gates.skip_compute=False
configs/cifar10_resnet110.py runs/r110_seeds --config.seeds=(1,2) --config.model.dtype=float32"}
STACK_CONFIG=${STACK_CONFIG:-configs/cifar10_resnet110.py}
STACK_DIR=${STACK_DIR:-runs/r110_mixed}
STACK_RUNS=${STACK_RUNS:-'("e8:gates.sampler=effective,gates.k=23","sd:gates.sampler=stochastic_depth,gates.p_last=0.5,gates.keep_downsampling=false","seed1:seed=1","seed2:seed=2")'}
if [ -n "$STACK" ]; then  # the whole queue as one program (the QUEUE lines split on spaces)
  QUEUE="$STACK_CONFIG $STACK_DIR --config.stack=$STACK_RUNS --config.model.dtype=float32"
fi
# XLA_FLAGS of the training runs only (the bench steps set their own), e.g. command buffers
# over conditionals: "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"
TRAIN_XLA_FLAGS=${TRAIN_XLA_FLAGS-$XLA_FLAGS}
O=${O-"--config.data.dir=.gpu/data --config.data.source=bin --config.model.dtype=bfloat16 \
--config.model.unroll=0"}
E_O=${E_O-"--config.train.steps_per_call=50 --config.train.log_every=1000 \
--config.train.eval_every=4000 --config.checkpoint.every=2000 --config.checkpoint.max_to_keep=2"}
export PYTHONUNBUFFERED=1
stamp() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }
quiet() { grep -v "^I1\|^W1\|^I0000\|^WARNING: All log"; }

# The issue's table: every row it asks for (the gated steps' cost included), with profiles.
CORE_STEPS="torch_eager torch_compile train128 train1024 eval lesion paths train_effective train_sd"

stamp "prepare ($STAGE, ${TOTAL}s)"
if [ -n "$SMOKE" ]; then smoke=--smoke; else bash launch/device.sh true; fi
export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null; } >> "$OUT/session.log"

case $STAGE in
  bench)
    OUT="$OUT" BUDGET_S=$((TOTAL - SECONDS - 15)) STEPS=${STEPS-"$CORE_STEPS"} \
      PROFILE_DIR=/tmp/bench_profile bash bench/run_all.sh $smoke 2>&1 | tail -40 \
      | tee -a "$OUT/session.log"
    ;;
  rest)
    if [ -n "$EXTRA_STEPS" ]; then  # bench steps call 1 had no time for
      stamp "bench steps: $EXTRA_STEPS"
      OUT="$OUT" BUDGET_S=${EXTRA_BUDGET_S:-180} STEPS="$EXTRA_STEPS" bash bench/run_all.sh \
        $smoke 2>&1 | tail -25 | tee -a "$OUT/session.log"
    fi
    if [ -n "$LESION" ]; then  # the lesion study of $R (resumes a cut one)
      stamp "lesion study of $R"
      timeout 240 python3 -m resnet_ensemble --mode=lesion --config="$CONFIG_R" --workdir="$R" \
        $O --config.lesion.chunk=64 2>&1 | quiet | tee -a "$OUT/session.log"
      cp "$R/lesion.json" "$OUT/$(basename "$R").lesion.json"
      cp "$R/lesion.partial.json" "$OUT/$(basename "$R").lesion.partial.json" 2>/dev/null
    fi
    left=$((TOTAL - SECONDS - 15))
    if [ -n "$SECOND_RUN" ] && [ "$left" -gt 60 ]; then
      # A second run trained at the same time, in a second process (0.45 of the memory each):
      # worth it where bench's train128_2proc shows the two fill each other's gaps.
      stamp "$SECOND_RUN ($SECOND_CONFIG) alongside the queue, budget ${left}s"
      XLA_FLAGS="$TRAIN_XLA_FLAGS" XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 \
        bash launch/device_train.sh "$SECOND_CONFIG" \
        "$SECOND_RUN" "$left" $O $E_O $SECOND_O > /tmp/second_run.log 2>&1 &
      second=$!
      export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
    fi
    while read -r cfg wd extra; do
      [ -n "$cfg" ] || continue
      left=$((TOTAL - SECONDS - 15))
      if [ "$left" -le 90 ]; then stamp "no time left for $wd"; break; fi
      stamp "train $wd ($cfg $extra), budget ${left}s"
      XLA_FLAGS="$TRAIN_XLA_FLAGS" bash launch/device_train.sh "$cfg" "$wd" "$left" $O $E_O \
        $extra < /dev/null 2>&1 | quiet | tail -15 | tee -a "$OUT/session.log"
    done <<< "$QUEUE"
    if [ -n "${second:-}" ]; then
      wait "$second"
      stamp "$SECOND_RUN:"
      quiet < /tmp/second_run.log | tail -15 | tee -a "$OUT/session.log"
    fi
    ;;
  *) echo "unknown stage $STAGE (bench or rest)" >&2; exit 2 ;;
esac
stamp "done"
