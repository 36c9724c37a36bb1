#!/usr/bin/env bash
# Brings a GPU run home from the device tool's files: unpacks NAME.tar.part-* (the one file
# launch/device_train.sh packs) into runs/NAME; an unfinished run's parts go to .gpu/resume/
# so the next call resumes it; once the run has reached its last step it exports its variables and
# marks it finished (.gpu/resume/NAME.finished, which device_train.sh skips), and
# publishes config.json, metrics.jsonl, final_metrics.json, train.log and variables.msgpack in
# DEST (the checkpoint, with its optimizer state, stays in runs/NAME: it is not published).
#
#   bash launch/publish_run.sh FILES_AT NAME CONFIG DEST [--config.x=y ...]
#   e.g. bash launch/publish_run.sh /work/.device/3 r110_eff_s0 \
#          configs/cifar10_resnet110_effective.py results/cifar10/resnet110_effective_seed0 \
#          --config.data.dir=/tmp/cif --config.model.dtype=bfloat16 --config.model.unroll=0
# The overrides are those of the GPU run, except data.dir: export reads the checkpoint through
# the same config checks as every mode (a mismatch is an error naming the field).
# VARIABLES=0 publishes the metrics without variables.msgpack (extra seeds: results/ stays
# under its 40 MB; the checkpoint in runs/NAME still has them).
set -eo pipefail
# shellcheck source=launch/unpack.sh
source "$(dirname "${BASH_SOURCE[0]}")/unpack.sh"
files_at=${1:?usage: publish_run.sh FILES_AT NAME CONFIG DEST [overrides]}
name=${2:?NAME}; config=${3:?CONFIG}; dest=${4:?DEST}
shift 4
parts=("$files_at/$name".tar.part-*)
[ -e "${parts[0]}" ] || { echo "no $files_at/$name.tar.part-* to publish" >&2; exit 1; }
run=runs/$name
mkdir -p .gpu/resume
# The parts hold the newest finished checkpoint: it replaces runs/NAME/checkpoints only once
# the whole pack has been unpacked (a corrupt pack keeps the old ones).
unpack_run "$run" "${parts[@]}"
rm -f .gpu/resume/"$name".tar.part-*
step=$(newest_step "$run")
total=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["train"]["num_steps"])' \
  "$run/config.json")
if [ "$step" != "$total" ]; then
  cp "${parts[@]}" .gpu/resume/
  echo "$name: checkpoint step $step of $total, not finished: nothing published; the parts are"
  echo "in .gpu/resume/ (carried with .gpu, the next device_train.sh call resumes from them)"
  exit 0
fi
echo "$name: finished (step $step)"
touch .gpu/resume/"$name".finished  # device_train.sh will not train it again
files=(config.json metrics.jsonl final_metrics.json train.log)
if [ "${VARIABLES:-1}" != 0 ]; then
  python3 -m resnet_ensemble --mode=export --config="$config" --workdir="$run" "$@" \
    2>&1 | grep -v "^I1\|^W1\|^I0000\|^WARNING: All log"
  files+=(variables.msgpack)
fi
mkdir -p "$dest"
published=()
for f in "${files[@]}"; do
  if [ -e "$run/$f" ]; then cp "$run/$f" "$dest/"; published+=("$f"); fi
done
echo "published ${published[*]} in $dest"
