# shellcheck shell=bash
# Sourced by device_train.sh and publish_run.sh: a run's pack (the NAME.tar.part-* files that
# device_train.sh writes) is unpacked beside the run directory and moved in only once all of it
# has been read, so a truncated or corrupt pack never costs the checkpoints already there.

# newest_step DIR: the largest numbered checkpoint in DIR/checkpoints (empty if none).
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
