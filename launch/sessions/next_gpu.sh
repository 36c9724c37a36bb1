#!/usr/bin/env bash
# The next lent-GPU session's first call (issues 7, 6, 4), in priority order, each step under
# its own time cap inside TOTAL seconds, every result in $OUT as soon as it exists (at most 8
# files come back: session.log, resnet110_seed0.lesion.json, bench.jsonl, bench.log, table.md,
# r110_eff_s0.tar.part-aa):
#   1. the full lesion study (E1, E3 both variants, E4) on the published ResNet-110 (~4 min);
#   2. issue 6's benchmarks without the steps measured by real runs (lesion, paths), the
#      gated steps with and without compute skipping (issue 4) first;
#   3. ResNet-110 with effective paths only (E8) if time is left (the next call or session
#      resumes it from .gpu/resume/r110_eff_s0.tar.part-aa, launch/device_train.sh).
#   run (device tool, carry [".gpu"], timeout_s 590): bash launch/sessions/next_gpu.sh 570
# CPU smoke: SMOKE=1 R=<trained quickstart workdir> CONFIG_R=configs/quickstart.py \
#   CONFIG_E=configs/quickstart.py O="" E_O="--config.gates.sampler=effective \
#   --config.gates.k=5 --config.train.num_steps=40" bash launch/sessions/next_gpu.sh 200
set -o pipefail
TOTAL=${1:-570}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=${R:-results/cifar10/resnet110_seed0}
CONFIG_R=${CONFIG_R:-configs/cifar10_resnet110.py}
CONFIG_E=${CONFIG_E:-configs/cifar10_resnet110_effective.py}
O=${O-"--config.data.dir=.gpu/data --config.data.source=bin --config.model.dtype=bfloat16 \
--config.model.unroll=0"}
E_O=${E_O-"--config.train.steps_per_call=50 --config.train.log_every=1000 \
--config.train.eval_every=4000 --config.checkpoint.every=2000 --config.checkpoint.max_to_keep=2"}
export PYTHONUNBUFFERED=1
stamp() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }
quiet() { grep -v "^I1\|^W1\|^I0000\|^WARNING: All log"; }

stamp "prepare"
bash launch/device.sh true
export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

stamp "1. E1-E4 on $R"
timeout 270 python3 -m resnet_ensemble --mode=lesion --config="$CONFIG_R" --workdir="$R" $O \
  --config.lesion.chunk=64 2>&1 | quiet | tee -a "$OUT/session.log"
cp "$R/lesion.json" "$OUT/$(basename "$R").lesion.json"
cp "$R/lesion.partial.json" "$OUT/$(basename "$R").lesion.partial.json" 2>/dev/null  # if cut

left=$((TOTAL - SECONDS))
bench=$((left - 20))
stamp "2. benchmarks, budget ${bench}s"
[ -n "$SMOKE" ] && smoke=--smoke && bench=$((left / 2))
OUT="$OUT" BUDGET_S=$bench TORCH_COMPILE_MIN_S=9999 \
  STEPS="torch_eager train128 train_effective train_effective_multiply train_sd \
train_sd_multiply train1024 eval" \
  bash bench/run_all.sh $smoke 2>&1 | tail -20 | tee -a "$OUT/session.log"

left=$((TOTAL - SECONDS - 15))
stamp "3. effective-path training, budget ${left}s"
[ "$left" -gt 45 ] && bash launch/device_train.sh "$CONFIG_E" runs/r110_eff_s0 "$left" $O $E_O \
  2>&1 | quiet | tail -15
stamp "done"
