#!/usr/bin/env bash
# Trains (or resumes) a config on the lent GPU for at most BUDGET_S seconds, then packs the
# newest finished checkpoint with config.json, metrics.jsonl, final_metrics.json and the log
# into ONE file, $OUT/NAME.tar.part-aa (split at 15 MiB: the device tool returns at most 8
# files of 16 MiB), NAME = basename of WORKDIR.
#   bash launch/device_train.sh CONFIG WORKDIR BUDGET_S [--config.x=y ...]
# If .gpu/resume/NAME.tar.part-* exists (a previous call's $OUT, carried), it is unpacked into
# WORKDIR first. Interrupting with SIGINT never loses a finished checkpoint: orbax writes to a
# temporary directory and renames it when complete.
set -o pipefail
config=$1; workdir=$2; budget=$3; shift 3
name=$(basename "$workdir")
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$workdir"
if [ ! -d "$workdir/checkpoints" ] && ls .gpu/resume/"$name".tar.part-* >/dev/null 2>&1; then
  cat .gpu/resume/"$name".tar.part-* | tar -C "$workdir" -xf -
  echo "unpacked $(ls "$workdir/checkpoints") from .gpu/resume/$name.tar.part-*"
fi
# A persistent compilation cache: a second call on the same warm machine (a resume) skips
# compiling; XLA's per-kernel autotune results are cached too and shared between programs.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR-/tmp/jax_cache}
timeout -s INT "$budget" python3 -m resnet_ensemble --config="$config" --workdir="$workdir" "$@" \
  2>&1 | grep -v "^I0000\|^WARNING: All log" | tee -a "$workdir/train.log"
latest=$(ls "$workdir/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
files=$(cd "$workdir" && ls -d config.json metrics.jsonl final_metrics.json train.log 2>/dev/null)
tar -C "$workdir" -cf - ${latest:+"checkpoints/$latest"} $files | split -b 15M - "$OUT/$name.tar.part-"
echo "packed ${latest:+checkpoint step $latest, }"$files" into $OUT/$name.tar.part-*"
