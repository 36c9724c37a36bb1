#!/usr/bin/env bash
# Device call of session 2 (2026-11-26), issue 7: finish ResNet-110 seed 0 from the committed
# step-53,400 checkpoint, measure the JPEG gap, E1 on it, then train VGG-15 with what is left
# of TOTAL seconds and run E1 on it. Every result lands in $OUT as it is made.
#   run (device tool, carry [".gpu"]): bash launch/sessions/2026-11-26_r110_vgg.sh 560
# CPU smoke: SMOKE=1 CONFIG_R=configs/quickstart.py CONFIG_V=configs/quickstart.py O="" bash ... 120
set -o pipefail
TOTAL=${1:-560}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CONFIG_R=${CONFIG_R:-configs/cifar10_resnet110.py}
CONFIG_V=${CONFIG_V:-configs/cifar10_vgg15.py}
O=${O-"--config.data.dir=.gpu/data --config.data.source=bin --config.model.dtype=bfloat16 \
--config.model.unroll=0 --config.train.steps_per_call=50 --config.train.log_every=1000 \
--config.train.eval_every=4000 --config.checkpoint.every=2000 --config.checkpoint.max_to_keep=2"}
E1="--config.lesion.max_k=0 --config.lesion.draws=1 --config.lesion.reorder_max_swaps=0 \
--config.lesion.exclude_downsampling_variant=False"
export PYTHONUNBUFFERED=1
stamp() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }

if [ -z "$SMOKE" ] && [ -f results/cifar10/r110_seed0_partial/ckpt.tar.part-aa ]; then
  mkdir -p .gpu/resume/r110_s0
  cp results/cifar10/r110_seed0_partial/{ckpt.tar.part-aa,config.json,metrics.jsonl} .gpu/resume/r110_s0/
fi
stamp "prepare + ResNet-110 resume"
bash launch/device.sh bash launch/device_train.sh "$CONFIG_R" runs/r110_s0 220 $O
export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
stamp "JPEG gap"
[ -f .gpu/cifar10-test-exact.npz.xz ] && python3 -m resnet_ensemble.jpeg_gap --config="$CONFIG_R" \
  --workdir=runs/r110_s0 --exact=.gpu/cifar10-test-exact.npz.xz $O 2>&1 | tail -3 | tee "$OUT/jpeg_gap.txt"
cp runs/r110_s0/jpeg_gap.json "$OUT/r110_s0.jpeg_gap.json" 2>/dev/null
stamp "E1 ResNet-110"
python3 -m resnet_ensemble --mode=lesion --config="$CONFIG_R" --workdir=runs/r110_s0 $O $E1 \
  2>&1 | grep -v "^I1\|^W1" | tail -8 | tee -a "$OUT/session.log"
cp runs/r110_s0/lesion.json "$OUT/r110_s0.lesion_e1.json"
left=$((TOTAL - SECONDS - 60))
stamp "VGG-15 train, budget ${left}s"
[ "$left" -gt 60 ] && bash launch/device_train.sh "$CONFIG_V" runs/vgg15_s0 "$left" $O
stamp "E1 VGG-15"
python3 -m resnet_ensemble --mode=lesion --config="$CONFIG_V" --workdir=runs/vgg15_s0 $O $E1 \
  2>&1 | grep -v "^I1\|^W1" | tail -8 | tee -a "$OUT/session.log"
cp runs/vgg15_s0/lesion.json "$OUT/vgg15_s0.lesion_e1.json"
stamp "done"
