#!/usr/bin/env bash
# Trains (or resumes) a config on the lent GPU for at most BUDGET_S seconds, then packs the
# newest finished checkpoint, config and metrics into $OUT so a later call or session resumes.
#   bash launch/device_train.sh CONFIG WORKDIR BUDGET_S [--config.x=y ...]
# If .gpu/resume/$(basename WORKDIR)/ckpt.tar.part-* exists (a previous call's $OUT, carried),
# it is unpacked into WORKDIR first. Interrupting with SIGINT never loses a finished
# checkpoint: orbax writes to a temporary directory and renames it when complete.
set -o pipefail
config=$1; workdir=$2; budget=$3; shift 3
name=$(basename "$workdir")
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$workdir"
resume=.gpu/resume/$name
if [ ! -d "$workdir/checkpoints" ] && ls "$resume"/ckpt.tar.part-* >/dev/null 2>&1; then
  cat "$resume"/ckpt.tar.part-* | tar -C "$workdir" -xf -
  cp "$resume"/config.json "$resume"/metrics.jsonl "$workdir"/ 2>/dev/null
  echo "unpacked $(ls "$workdir/checkpoints") from $resume"
fi
timeout -s INT "$budget" python3 -m resnet_ensemble --config="$config" --workdir="$workdir" "$@" \
  2>&1 | grep -v "^I0000\|^WARNING: All log" | tee -a "$OUT/$name.log"
latest=$(ls "$workdir/checkpoints" | grep -E '^[0-9]+$' | sort -n | tail -1)
if [ -n "$latest" ]; then
  tar -C "$workdir" -cf - "checkpoints/$latest" | split -b 15M - "$OUT/$name.ckpt.tar.part-"
  echo "packed checkpoint step $latest"
fi
cp "$workdir/config.json" "$OUT/$name.config.json"; cp "$workdir/metrics.jsonl" "$OUT/$name.metrics.jsonl"
