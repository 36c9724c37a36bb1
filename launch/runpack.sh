# shellcheck shell=bash
# Sourced by offline_gpu.sh: a run directory packed into one tar (split into parts if asked)
# and unpacked again, for hosts that keep nothing between uses. A pack holds the run's newest
# finished checkpoint and every file beside it (config.json, metrics, final metrics, the
# analyses' JSON, train.log, an exported variables.msgpack). It is
# unpacked beside the run directory and moved in only once all of it has been read, so a
# truncated or corrupt pack never costs the checkpoints already there.

# newest_step DIR: the largest numbered checkpoint in DIR/checkpoints (empty if none).
# Orbax writes a checkpoint to a temporary name and renames it when complete, so a numbered
# directory is a finished checkpoint.
newest_step() {
  local entry step="" name
  for entry in "$1"/checkpoints/*/; do
    name=${entry%/}; name=${name##*/}
    if [[ $name =~ ^[0-9]+$ ]] && { [ -z "$step" ] || [ "$name" -gt "$step" ]; }; then
      step=$name
    fi
  done
  printf '%s' "$step"
}

# pack_run RUN_DIR PREFIX [SPLIT]: writes PREFIX.tar.part-aa, -ab, ... (parts of SPLIT bytes,
# default 2G, as split -b takes it). Only the newest checkpoint: older ones are of no use to a
# resume, and the pack is what travels.
pack_run() {
  local run=$1 prefix=$2 split_size=${3:-2G} latest f files=()
  latest=$(newest_step "$run")
  for f in "$run"/*; do  # not LOCK: a lock belongs to a process of this host
    [ ! -f "$f" ] || [ "${f##*/}" = LOCK ] || files+=("${f##*/}")
  done
  rm -f "$prefix".tar.part-*
  tar -C "$run" -cf - ${latest:+"checkpoints/$latest"} ${files[@]+"${files[@]}"} \
    | split -b "$split_size" - "$prefix.tar.part-"
}

# unpack_run RUN_DIR PART...: untars the concatenated parts into a temporary directory next to
# RUN_DIR (same file system, so the moves below are renames); then its checkpoints/ replaces
# RUN_DIR/checkpoints and its files replace RUN_DIR's. Returns 1, RUN_DIR as it was, when tar
# fails or the pack holds no numbered checkpoint.
unpack_run() {
  local run=$1 parent tmp entry
  shift
  parent=$(dirname "$run")
  mkdir -p "$parent"
  tmp=$(mktemp -d "$parent/.unpack-$(basename "$run").XXXXXX") || return 1
  if ! cat "$@" | tar -C "$tmp" -xf -; then
    echo "error: the pack $* is not a whole tar (truncated or corrupt): $run left as it was" >&2
    rm -rf "$tmp"
    return 1
  fi
  if [ -z "$(newest_step "$tmp")" ]; then
    echo "error: the pack $* holds no checkpoints/STEP: $run left as it was" >&2
    rm -rf "$tmp"
    return 1
  fi
  mkdir -p "$run" || { rm -rf "$tmp"; return 1; }
  # The old checkpoints are set aside, not deleted, until the new ones are in place.
  if [ -e "$run/checkpoints" ] && ! mv "$run/checkpoints" "$tmp/checkpoints.old"; then
    rm -rf "$tmp"
    return 1
  fi
  if ! mv "$tmp/checkpoints" "$run/checkpoints"; then
    if [ -e "$tmp/checkpoints.old" ]; then
      mv "$tmp/checkpoints.old" "$run/checkpoints" \
        || { echo "error: $run's checkpoints are in $tmp/checkpoints.old" >&2; return 1; }
    fi
    rm -rf "$tmp"
    return 1
  fi
  for entry in "$tmp"/*; do
    [ -e "$entry" ] && [ "$entry" != "$tmp/checkpoints.old" ] || continue
    mv -f "$entry" "$run/" || return 1
  done
  rm -rf "$tmp"
}

# pack_name RUNS_ROOT RUN_DIR: the run's path below RUNS_ROOT with '/' written '--'
# (runs/r110_mixed/e8 below runs -> r110_mixed--e8), so nested runs of a stack get flat names.
pack_name() {
  local rel=${2#"$1"/}
  printf '%s' "${rel//\//--}"
}
