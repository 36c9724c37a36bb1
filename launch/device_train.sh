#!/usr/bin/env bash
# Trains (or resumes) a config on the lent GPU for at most BUDGET_S seconds, then packs the
# newest finished checkpoint with config.json, metrics.jsonl, final_metrics.json and the log
# into ONE file, $OUT/NAME.tar.part-aa (split at 15 MiB: the device tool returns at most 8
# files of 16 MiB), NAME = basename of WORKDIR.
#   bash launch/device_train.sh CONFIG WORKDIR BUDGET_S [--config.x=y ...]
# A stack of runs (--config.stack="(\"e8:gates.sampler=effective\",\"seed1:seed=1\")", or
# --config.seeds="(1,2)": runs seed1, seed2) trains its runs in WORKDIR/RUN: each is packed
# apart, as $OUT/NAME_RUN.tar.part-aa (publish_run.sh takes that name like any run's); the runs
# are those `python3 -m resnet_ensemble --mode=runs` lists for the same command.
# If .gpu/resume/NAME.tar.part-* (or NAME_RUN.tar.part-*) exists (a previous call's $OUT,
# carried), it is unpacked into WORKDIR (WORKDIR/RUN) first; a run publish_run.sh has
# published is skipped. Interrupting with SIGINT never loses a finished checkpoint: orbax
# writes to a temporary directory and renames it when complete.
set -o pipefail
# shellcheck source=launch/unpack.sh
source "$(dirname "${BASH_SOURCE[0]}")/unpack.sh"
config=$1; workdir=$2; budget=$3; shift 3
name=$(basename "$workdir")
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$workdir"
# The runs this command trains (WORKDIR, or WORKDIR/RUN for each run of a stack), checked
# like the training's config: a mistake stops here, before any pack is touched. On the CPU:
# listing them needs no device (and must not take a share of its memory).
listed=$(JAX_PLATFORMS=cpu python3 -m resnet_ensemble --mode=runs --config="$config" \
  --workdir="$workdir" "$@") || exit 2
mapfile -t runs <<< "$listed"
# pack_name RUN_DIR: NAME for the workdir itself, NAME_RUN for a run of a stack
pack_name() { if [ "$1" = "$workdir" ]; then echo "$name"; else echo "${name}_${1##*/}"; fi; }
# publish_run.sh leaves NAME.finished (NAME_RUN.finished) in .gpu/resume/ for a run it
# published: its pack is gone from there, so training it again would start it from step 0.
for run in "${runs[@]}"; do
  if [ -e ".gpu/resume/$(pack_name "$run").finished" ]; then
    echo "$name: finished and published (.gpu/resume/$(pack_name "$run").finished): nothing to train"
    exit 0
  fi
done
# unpack RUN_DIR PACK_NAME: a carried pack into a run that has no checkpoints yet. One that does
# not unpack whole stops here, rather than train from step 0 and pack that over the good one.
unpack() {
  local parts=(".gpu/resume/$2".tar.part-*)
  if [ ! -d "$1/checkpoints" ] && [ -e "${parts[0]}" ]; then
    unpack_run "$1" "${parts[@]}" || exit 1
    echo "unpacked $(newest_step "$1") from .gpu/resume/$2.tar.part-*"
  fi
}
for run in "${runs[@]}"; do
  unpack "$run" "$(pack_name "$run")"
done
# A persistent compilation cache: a second call on the same warm machine (a resume) skips
# compiling; XLA's per-kernel autotune results are cached too and shared between programs.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR-/tmp/jax_cache}
timeout -s INT "$budget" python3 -m resnet_ensemble --config="$config" --workdir="$workdir" "$@" \
  2>&1 | grep -v "^I0000\|^WARNING: All log" | tee -a "$workdir/train.log"
pack() {  # RUN_DIR PACK_NAME: the newest finished checkpoint, the run's files and the log
  local latest f files=()
  latest=$(newest_step "$1")
  for f in config.json metrics.jsonl final_metrics.json; do
    [ ! -e "$1/$f" ] || files+=("$f")
  done
  tar -C "$1" -cf - ${latest:+"checkpoints/$latest"} ${files[@]+"${files[@]}"} \
      -C "$(cd "$workdir" && pwd)" train.log \
    | split -b 15M - "$OUT/$2.tar.part-"
  echo "packed ${latest:+checkpoint step $latest, }${files[*]} train.log into $OUT/$2.tar.part-*"
}
for run in "${runs[@]}"; do
  if [ -d "$run" ]; then pack "$run" "$(pack_name "$run")"; fi
done
