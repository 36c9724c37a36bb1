#!/usr/bin/env bash
# Trains (or resumes) a config on the lent GPU for at most BUDGET_S seconds, then packs the
# newest finished checkpoint with config.json, metrics.jsonl, final_metrics.json and the log
# into ONE file, $OUT/NAME.tar.part-aa (split at 15 MiB: the device tool returns at most 8
# files of 16 MiB), NAME = basename of WORKDIR.
#   bash launch/device_train.sh CONFIG WORKDIR BUDGET_S [--config.x=y ...]
# A seed stack (--config.seeds="(1,2)") trains its runs in WORKDIR/seed{s}: each is packed
# apart, as $OUT/NAME_seed{s}.tar.part-aa (publish_run.sh takes that name like any run's).
# If .gpu/resume/NAME.tar.part-* (or NAME_seed{s}.tar.part-*) exists (a previous call's $OUT,
# carried), it is unpacked into WORKDIR (WORKDIR/seed{s}) first; a run publish_run.sh has
# published is skipped. Interrupting with SIGINT never loses a finished checkpoint: orbax
# writes to a temporary directory and renames it when complete.
set -o pipefail
# shellcheck source=launch/unpack.sh
source "$(dirname "${BASH_SOURCE[0]}")/unpack.sh"
config=$1; workdir=$2; budget=$3; shift 3
name=$(basename "$workdir")
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$workdir"
# publish_run.sh leaves NAME.finished (NAME_seed{s}.finished) in .gpu/resume/ for a run it
# published: its pack is gone from there, so training it again would start it from step 0.
for marker in ".gpu/resume/$name.finished" ".gpu/resume/$name"_seed*.finished; do
  if [ -e "$marker" ]; then
    echo "$name: finished and published (.gpu/resume/$name*.finished): nothing to train"
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
unpack "$workdir" "$name"
for part in ".gpu/resume/$name"_seed*.tar.part-aa; do
  [ -e "$part" ] || continue
  pack=$(basename "$part" .tar.part-aa)
  unpack "$workdir/${pack#"$name"_}" "$pack"
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
stacked=()
for run in "$workdir"/seed*/; do
  run=${run%/}
  [[ ${run##*/} =~ ^seed[0-9]+$ ]] && stacked+=("$run")
done
if [ ${#stacked[@]} -gt 0 ]; then
  for run in "${stacked[@]}"; do pack "$run" "${name}_${run##*/}"; done
else
  pack "$workdir" "$name"
fi
