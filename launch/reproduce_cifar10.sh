#!/usr/bin/env bash
# The whole paper on CIFAR-10 on one GPU host: every run trained, every analysis, the report.
# Resumable: rerun the same command and each stage picks up where it stopped. A finished stage
# is skipped (its runs have their final metrics, its JSON is there), a stopped training
# resumes from its newest checkpoint, a cut lesion study from lesion.partial.json.
#
#   launch/reproduce_cifar10.sh [--data DIR] [--runs DIR] [--only STAGE,...]
#                               [--budget STAGE=SECONDS ...] [--dry-run] [-- OVERRIDES ...]
#
# Stages, in order, with their time budgets (seconds; each stage is stopped with SIGINT when
# its budget is spent: training saves a checkpoint and exits, the next call resumes it). The
# budgets leave room above one H100's measured speed (BUILD_NOTES.md):
#   r110        1500  ResNet-110 seed 0, the paper's recipe (64k steps at ~100 steps/s)
#   vgg          600  the plain VGG-15 with the same recipe (~270 steps/s)
#   stack       5400  ONE program, vmapped over four ResNet-110 runs in float32: e8 (E8,
#                     effective paths: 23 of 54 blocks per batch, downsampling kept), sd
#                     (E10's stochastic depth, p_L = 0.5, every block droppable), seed1 and
#                     seed2 of the paper's recipe (its spread over seeds; float32 is the
#                     paper's precision). Not measured on a GPU yet: at worst 4 runs' time.
#   lesion_r110  900  E1, E3 (both variants), E4 on ResNet-110 seed 0 (~6 min on an H100)
#   lesion_vgg   300  E1 on VGG-15 (Fig. 3's plain panel)
#   lesion_sd    300  E1 on the stochastic-depth run (E10, Fig. 8)
#   paths        600  E5-E7: E6 at 1,000 sampled paths per length (~1 min on an H100)
#   report       600  report.md, the table and every figure, from the JSON only
#
# Options:
#   --data DIR          CIFAR-10 for --config.data.dir: a folder holding cifar-10-batches-bin/
#                       (default: $OFFLINE_BUNDLE/data under launch/offline_gpu.sh, else
#                       ~/.cache/cifar10)
#   --runs DIR          where the runs, logs and report go (default runs/cifar10):
#                       DIR/resnet110_seed0, DIR/vgg15_seed0, DIR/r110_stack/{e8,sd,seed1,seed2},
#                       DIR/logs/STAGE.log, DIR/report/
#   --only S1,S2        run only these stages (still skipping what is done)
#   --budget STAGE=S    another time budget for one stage (repeatable)
#   --dry-run           print what would run (prefixed "+ ") and what is skipped; runs nothing
#   -- OVERRIDES        appended to every program command, e.g. -- --config.data.source=tfds
#   -h, --help          this message
# Environment: PYTHON (python3); FAST (default: bf16 compute with float32 parameters and
# BatchNorm statistics, unrolled scans, 50 steps per call; "" for the config's own); CADENCE
# (log, eval and checkpoint cadence); STACK_RUNS (the --config.stack value); STACK_DTYPE
# (float32); E6_PATHS (1000, the paper's sampled paths per length); CONFIG_R110, CONFIG_VGG (the configs, default configs/cifar10_resnet110.py and
# configs/cifar10_vgg15.py).
# Exit status: 0 when every selected stage is done, 3 when one is left to a later call (out of
# budget, or waiting for a run to finish), 2 for a bad command line, else the failing program's.
# On a GPU host without internet: launch/offline_gpu.sh run BUNDLE --runs runs --
#   launch/reproduce_cifar10.sh (see launch/README.md); the report and logs are then also
#   copied to $OFFLINE_OUT, the folder that goes home with the runs' packs.
set -uo pipefail  # not -e: a stage out of budget must not stop the others

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
CONFIG_R110=${CONFIG_R110:-configs/cifar10_resnet110.py}
CONFIG_VGG=${CONFIG_VGG:-configs/cifar10_vgg15.py}
FAST=${FAST-"--config.model.dtype=bfloat16 --config.model.unroll=0 --config.train.steps_per_call=50"}
CADENCE=${CADENCE-"--config.train.log_every=1000 --config.train.eval_every=4000 \
--config.checkpoint.every=2000 --config.checkpoint.max_to_keep=2"}
STACK_RUNS=${STACK_RUNS:-'("e8:gates.sampler=effective,gates.k=23","sd:gates.sampler=stochastic_depth,gates.p_last=0.5,gates.keep_downsampling=false","seed1:seed=1","seed2:seed=2")'}
STACK_DTYPE=${STACK_DTYPE:-float32}
E6_PATHS=${E6_PATHS:-1000}
E1_ONLY="--config.lesion.max_k=0 --config.lesion.draws=1 --config.lesion.reorder_max_swaps=0 \
--config.lesion.exclude_downsampling_variant=False"
STAGES="r110 vgg stack lesion_r110 lesion_vgg lesion_sd paths report"
declare -A BUDGET=([r110]=1500 [vgg]=600 [stack]=5400 [lesion_r110]=900 [lesion_vgg]=300
                   [lesion_sd]=300 [paths]=600 [report]=600)

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "reproduce_cifar10.sh: error: $*" >&2; exit 2; }
# shellcheck source=launch/quote.sh
source "$REPO/launch/quote.sh"
data=${OFFLINE_BUNDLE:+$OFFLINE_BUNDLE/data}
data=${data:-$HOME/.cache/cifar10}
runs=runs/cifar10 only="" dry_run=0 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --data) [ $# -ge 2 ] || die "--data needs a value"; data=$2; shift 2 ;;
    --runs) [ $# -ge 2 ] || die "--runs needs a value"; runs=$2; shift 2 ;;
    --only) [ $# -ge 2 ] || die "--only needs a value"; only=$2; shift 2 ;;
    --budget)
      [ $# -ge 2 ] || die "--budget needs STAGE=SECONDS"
      [[ $2 =~ ^([a-z0-9_]+)=([0-9]+)$ ]] || die "--budget $2: expected STAGE=SECONDS"
      [ -n "${BUDGET[${BASH_REMATCH[1]}]+x}" ] || die "--budget $2: no stage ${BASH_REMATCH[1]} (stages: $STAGES)"
      BUDGET[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument: $1 (program overrides go after --); see --help" ;;
  esac
done
for s in ${only//,/ }; do
  [[ " $STAGES " == *" $s "* ]] || die "--only: no stage $s (stages: $STAGES)"
done
R110=$runs/resnet110_seed0 VGG=$runs/vgg15_seed0 STACK=$runs/r110_stack
# The stack's run names: each entry of STACK_RUNS up to its ':'.
stack_names=()
while IFS= read -r entry; do
  [ -z "$entry" ] || stack_names+=("${entry%%:*}")
done < <(sed -e 's/^[( ]*"//' -e 's/"[ ,)]*$//' -e 's/" *, *"/\n/g' <<< "$STACK_RUNS")

# finished RUN_DIR...: every run has final metrics at its config's last step.
finished() {
  "$PYTHON" - "$@" <<'EOF'
import json, os, sys
for run in sys.argv[1:]:
  try:
    steps = json.load(open(os.path.join(run, "config.json")))["train"]["num_steps"]
    if json.load(open(os.path.join(run, "final_metrics.json")))["step"] < steps:
      sys.exit(1)
  except (OSError, ValueError, KeyError):
    sys.exit(1)
EOF
}
# analysed FILE [SAMPLES_PER_K]: an analysis' JSON of a finished run (E6 with that many paths).
analysed() {
  "$PYTHON" - "$@" <<'EOF'
import json, os, sys
path = sys.argv[1]
if not os.path.exists(path) and path.endswith("gradients.json"):  # a run from before the rename
  path = path[:-len("gradients.json")] + "paths.json"
try:
  d = json.load(open(path))
except (OSError, ValueError):
  sys.exit(1)
if d.get("finished") is False:
  sys.exit(1)
if len(sys.argv) > 2 and d.get("gradient", {}).get("samples_per_k") != int(sys.argv[2]):
  sys.exit(1)
EOF
}

left=0 failed=0
stamp() { echo "[$(date -u +%FT%TZ) +${SECONDS}s] $*"; }
# stage NAME DONE_TEST -- COMMAND...: skipped when not selected or DONE_TEST succeeds; else
# COMMAND under the stage's budget, its output in $runs/logs/NAME.log.
stage() {
  local name=$1 done_test=$2 rc=0 budget=${BUDGET[$1]}
  shift 3
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then return 0; fi
  if eval "$done_test"; then stamp "$name: done, skipped"; return 0; fi
  stamp "$name: budget ${budget}s"
  echo "+ $(quote_all timeout -s INT "$budget" "$@")"
  if [ "$dry_run" = 1 ]; then
    [[ $name == lesion_* || $name == paths || $name == report ]] || scheduled+=" $name "
    return 0
  fi
  mkdir -p "$runs/logs"
  timeout -s INT "$budget" "$@" 2>&1 | grep --line-buffered -v "^I0000\|^WARNING: All log" \
    | tee -a "$runs/logs/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    stamp "$name: finished"
  elif [ "$rc" = 124 ] || [ "$rc" = 130 ]; then
    stamp "$name: out of its ${budget}s budget, stopped (checkpoint saved): rerun to resume"
    left=1
  else
    stamp "$name: failed (exit $rc), see $runs/logs/$name.log"
    failed=$rc
  fi
}
# waiting NAME TRAINING_STAGE RUN...: a stage whose runs are not finished yet is left to a
# later call (a dry run assumes that the training it prints finishes in its budget).
scheduled=""
waiting() {
  local name=$1 training=$2
  shift 2
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then return 1; fi
  if finished "$@"; then return 1; fi
  if [[ $scheduled == *" $training "* ]]; then
    stamp "$name: once $training has finished"
    return 1
  fi
  stamp "$name: waits for $* to finish training (rerun this script)"
  left=1
}

program=("$PYTHON" -m resnet_ensemble)
common=(--config.data.dir="$data" $FAST ${extra[@]+"${extra[@]}"})
stack_dirs=()
for n in "${stack_names[@]}"; do stack_dirs+=("$STACK/$n"); done
stamp "reproduce_cifar10: runs in $runs, data in $data"

stage r110 'finished "$R110"' -- "${program[@]}" --config="$CONFIG_R110" --workdir="$R110" \
  --mode=train "${common[@]}" $CADENCE
stage vgg 'finished "$VGG"' -- "${program[@]}" --config="$CONFIG_VGG" --workdir="$VGG" \
  --mode=train "${common[@]}" $CADENCE
stage stack 'finished "${stack_dirs[@]}"' -- "${program[@]}" --config="$CONFIG_R110" \
  --workdir="$STACK" --mode=train "${common[@]}" $CADENCE --config.stack="$STACK_RUNS" \
  --config.model.dtype="$STACK_DTYPE"
waiting lesion_r110 r110 "$R110" || stage lesion_r110 'analysed "$R110/lesion.json"' -- \
  "${program[@]}" --config="$CONFIG_R110" --workdir="$R110" --mode=lesion "${common[@]}"
waiting lesion_vgg vgg "$VGG" || stage lesion_vgg 'analysed "$VGG/lesion.json"' -- \
  "${program[@]}" --config="$CONFIG_VGG" --workdir="$VGG" --mode=lesion "${common[@]}" $E1_ONLY
waiting lesion_sd stack "$STACK/sd" || stage lesion_sd 'analysed "$STACK/sd/lesion.json"' -- \
  "${program[@]}" --config="configs/run.py:$STACK/sd" --workdir="$STACK/sd" --mode=lesion \
  "${common[@]}" $E1_ONLY
waiting paths r110 "$R110" || stage paths 'analysed "$R110/gradients.json" "$E6_PATHS"' -- \
  "${program[@]}" --config="$CONFIG_R110" --workdir="$R110" --mode=gradients "${common[@]}" \
  --config.paths.samples_per_k="$E6_PATHS"
seeds=""
for n in "${stack_names[@]}"; do
  [[ $n != seed* ]] || seeds+="${seeds:+,}$STACK/$n"
done
stage report 'false' -- "${program[@]}" --config="$CONFIG_R110" --workdir="$R110" --mode=report \
  --config.report.vgg_workdir="$VGG" --config.report.sd_workdir="$STACK/sd" \
  --config.report.effective_workdir="$STACK/e8" --config.report.seed_workdirs="$seeds" \
  --config.report.out_dir="$runs/report" ${extra[@]+"${extra[@]}"}

if [ "$failed" != 0 ]; then exit "$failed"; fi
if [ "$dry_run" = 1 ]; then stamp "dry run: nothing ran"; exit 0; fi
if [ -n "${OFFLINE_OUT:-}" ]; then  # under launch/offline_gpu.sh: the report and logs go home
  mkdir -p "$OFFLINE_OUT"
  for d in "$runs/report" "$runs/logs"; do [ ! -d "$d" ] || cp -R "$d" "$OFFLINE_OUT/"; done
  stamp "copied the report and logs to $OFFLINE_OUT"
fi
if [ "$left" = 1 ]; then stamp "not done yet: rerun the same command to continue"; exit 3; fi
stamp "done: $runs/report/report.md"
