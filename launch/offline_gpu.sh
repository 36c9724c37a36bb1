#!/usr/bin/env bash
# Runs resnet_ensemble on a GPU host that has no internet: everything the host lacks travels
# in one folder, the bundle, next to the checkout.
#
#   here (internet):  launch/offline_gpu.sh bundle BUNDLE [--package SPEC ...] [--data DIR]
#                         [--file PATH ...] [--setup CMD] [--python-version 3.12]
#                         [--platform manylinux_2_28_x86_64]
#   there (GPU):      launch/offline_gpu.sh run BUNDLE [--runs DIR] [--out DIR] [--budget S]
#                         [--split SIZE] -- COMMAND ...
#
# bundle: downloads wheels of the packages the host lacks (default: ml_collections and clu at
#   the versions of constraints.txt, the two pure-Python packages a JAX GPU image usually
#   lacks; --package adds any other, e.g. --package etils==1.15.0) for the host's Python and
#   platform into BUNDLE/wheels, copies a dataset folder into BUNDLE/data (--data DIR: its
#   contents, e.g. the folder holding cifar-10-batches-bin/), any other file into BUNDLE/
#   (--file), and writes BUNDLE/setup.sh from --setup CMD (run once on the host, in BUNDLE:
#   e.g. unpack a dataset archive into data/). Carry the checkout and BUNDLE to the host.
# run: installs BUNDLE/wheels/*.whl into BUNDLE/site from those files only (no index, no
#   dependencies: the host's own packages stay as they are), puts BUNDLE/site and the checkout
#   on PYTHONPATH, checks that every module the package needs imports (a missing one is named,
#   with the --package to add), runs BUNDLE/setup.sh once, then COMMAND (e.g. python3 -m
#   resnet_ensemble ... --config.data.dir=BUNDLE/data, or launch/reproduce_cifar10.sh).
#   The environment gets OFFLINE_BUNDLE=BUNDLE, OFFLINE_OUT (the --out folder) and
#   PYTHONUNBUFFERED=1.
#   --budget S stops COMMAND with SIGINT after S seconds: a training run saves a checkpoint
#   and exits (130), so the next run resumes it.
#   --runs DIR: for a host that keeps nothing between uses. Before COMMAND, each carried pack
#   BUNDLE/resume/NAME.tar.part-* is unpacked into DIR/NAME ('--' in NAME stands for '/':
#   r110_mixed--e8 is DIR/r110_mixed/e8), only where that run has no checkpoint yet; a pack
#   that does not unpack whole stops the script before COMMAND runs, the run as it was (it is
#   unpacked beside the run and moved in only when complete). After COMMAND, whatever its exit
#   status, every run under DIR is packed into --out (default BUNDLE/out) as NAME.tar.part-*
#   (its newest checkpoint and every file beside it: config.json, metrics, the analyses' JSON,
#   train.log; parts of --split bytes, default 2G). The command finds --out in OFFLINE_OUT
#   (reproduce_cifar10.sh copies its report and logs there). Carry --out home; to resume on a
#   fresh host, put its pack files in BUNDLE/resume/ and run the same command again.
#   Exit status: COMMAND's (1 for a bad carried pack, 2 for a bad command line).
#
# Options of both: --dry-run prints the commands (prefixed "+ ") and runs nothing; -h, --help.
# Environment: PYTHON (default python3), JAX_COMPILATION_CACHE_DIR (default
# /tmp/jax_compilation_cache: a second run on the same warm host skips compiling).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/runpack.sh
source "$REPO/launch/runpack.sh"
PYTHON=${PYTHON:-python3}
# What `import resnet_ensemble` and its command line need on the host.
MODULES="jax flax optax orbax.checkpoint ml_collections clu etils absl numpy matplotlib"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "offline_gpu.sh: error: $*" >&2; exit 2; }
# shellcheck source=launch/quote.sh
source "$REPO/launch/quote.sh"
dry_run=0
run() {
  echo "+ $(quote_all "$@")"
  [ "$dry_run" = 1 ] || "$@"
}
pinned() {  # pinned NAME: NAME==VERSION from constraints.txt (NAME alone if it is not there)
  local line
  line=$(grep -i "^${1}==" "$REPO/constraints.txt" || true)
  printf '%s' "${line:-$1}"
}

bundle() {
  local dir=$1 pyver=3.12 platform=manylinux_2_28_x86_64 data="" setup=""
  local packages=() files=() f
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --package) [ $# -ge 2 ] || die "--package needs a value"; packages+=("$2"); shift 2 ;;
      --data) [ $# -ge 2 ] || die "--data needs a value"; data=$2; shift 2 ;;
      --file) [ $# -ge 2 ] || die "--file needs a value"; files+=("$2"); shift 2 ;;
      --setup) [ $# -ge 2 ] || die "--setup needs a value"; setup=$2; shift 2 ;;
      --python-version) [ $# -ge 2 ] || die "--python-version needs a value"; pyver=$2; shift 2 ;;
      --platform) [ $# -ge 2 ] || die "--platform needs a value"; platform=$2; shift 2 ;;
      --dry-run) dry_run=1; shift ;;
      *) die "unknown argument to bundle: $1" ;;
    esac
  done
  [ -z "$data" ] || [ -d "$data" ] || die "--data $data: no such directory"
  for f in ${files[@]+"${files[@]}"}; do [ -f "$f" ] || die "--file $f: no such file"; done
  packages=("$(pinned ml_collections)" "$(pinned clu)" ${packages[@]+"${packages[@]}"})
  run mkdir -p "$dir/wheels"
  run "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
      --implementation cp --platform "$platform" -d "$dir/wheels" "${packages[@]}"
  if [ -n "$data" ]; then
    run mkdir -p "$dir/data"
    run cp -R "$data/." "$dir/data/"
  fi
  for f in ${files[@]+"${files[@]}"}; do run cp "$f" "$dir/"; done
  if [ -n "$setup" ]; then
    echo "+ write $dir/setup.sh: $setup"
    [ "$dry_run" = 1 ] || printf '#!/usr/bin/env bash\nset -euo pipefail\n%s\n' "$setup" \
      > "$dir/setup.sh"
  fi
  [ "$dry_run" = 1 ] || echo "bundle ready: $(du -sh "$dir" | cut -f1) in $dir"
}

run_there() {
  local dir=$1 runs="" out="" budget="" split_size=2G rc=0 parts name target run_dir
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --runs) [ $# -ge 2 ] || die "--runs needs a value"; runs=$2; shift 2 ;;
      --out) [ $# -ge 2 ] || die "--out needs a value"; out=$2; shift 2 ;;
      --budget) [ $# -ge 2 ] || die "--budget needs a value"; budget=$2; shift 2 ;;
      --split) [ $# -ge 2 ] || die "--split needs a value"; split_size=$2; shift 2 ;;
      --dry-run) dry_run=1; shift ;;
      --) shift; break ;;
      *) die "unknown argument to run: $1 (the command goes after --)" ;;
    esac
  done
  [ $# -gt 0 ] || die "no command after --"
  [ -d "$dir" ] || die "$dir: no such bundle directory"
  [ -z "$budget" ] || [[ $budget =~ ^[0-9]+$ ]] || die "--budget $budget: seconds, an integer"
  dir=$(cd "$dir" && pwd)
  out=${out:-$dir/out}
  export OFFLINE_BUNDLE=$dir OFFLINE_OUT=$out PYTHONUNBUFFERED=1
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR-/tmp/jax_compilation_cache}
  local wheels=("$dir"/wheels/*.whl)
  if [ -e "${wheels[0]}" ] && [ ! -e "$dir/site/.installed" ]; then
    run "$PYTHON" -m pip install -q --no-index --no-deps --target "$dir/site" "${wheels[@]}"
    [ "$dry_run" = 1 ] || touch "$dir/site/.installed"
  fi
  export PYTHONPATH="$dir/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  echo "+ export PYTHONPATH=$(quote_all "$PYTHONPATH")"
  if [ "$dry_run" = 0 ]; then
    "$PYTHON" - $MODULES <<'EOF' || exit 1
import importlib, sys
missing = []
for name in sys.argv[1:]:
  try:
    importlib.import_module(name)
  except ImportError as e:
    missing.append(f"{name} ({e})")
if missing:
  sys.exit("offline_gpu.sh: error: not importable on this host: " + "; ".join(missing)
           + ". Add its wheel to the bundle: launch/offline_gpu.sh bundle BUNDLE --package NAME")
EOF
  fi
  if [ -f "$dir/setup.sh" ] && [ ! -e "$dir/.setup-done" ]; then
    echo "+ (cd $(quote_all "$dir") && bash setup.sh)"
    if [ "$dry_run" = 0 ]; then
      (cd "$dir" && bash setup.sh) || { echo "offline_gpu.sh: error: $dir/setup.sh failed" >&2; exit 1; }
      touch "$dir/.setup-done"
    fi
  fi
  if [ -n "$runs" ]; then
    for parts in "$dir"/resume/*.tar.part-aa; do
      [ -e "$parts" ] || continue
      name=$(basename "$parts" .tar.part-aa)
      target=$runs/${name//--//}
      if [ -n "$(newest_step "$target")" ]; then
        echo "resume: $target has checkpoints already; $parts not unpacked"
        continue
      fi
      echo "+ unpack_run $(quote_all "$target" "$dir/resume/$name".tar.part-*)"
      if [ "$dry_run" = 0 ]; then
        unpack_run "$target" "$dir/resume/$name".tar.part-* || exit 1
        echo "resume: unpacked step $(newest_step "$target") of $target from $dir/resume/$name.tar.part-*"
      fi
    done
  fi
  local cmd=("$@")
  [ -z "$budget" ] || cmd=(timeout -s INT "$budget" "$@")
  echo "+ $(quote_all "${cmd[@]}")"
  if [ "$dry_run" = 0 ]; then
    "${cmd[@]}" || rc=$?
  fi
  if [ -n "$runs" ]; then
    echo "+ pack every run under $(quote_all "$runs") into $(quote_all "$out")"
    if [ "$dry_run" = 0 ] && [ -d "$runs" ]; then
      mkdir -p "$out"
      while IFS= read -r -d '' run_dir; do
        run_dir=${run_dir%/checkpoints}
        [ -n "$(newest_step "$run_dir")" ] || continue
        name=$(pack_name "$runs" "$run_dir")
        pack_run "$run_dir" "$out/$name" "$split_size"
        echo "packed step $(newest_step "$run_dir") of $run_dir into $out/$name.tar.part-*"
      done < <(find "$runs" -name ".unpack-*" -prune -o -type d -name checkpoints -prune -print0 | sort -z)
    fi
  fi
  return "$rc"
}

case "${1:-}" in
  -h|--help|"") usage; [ -n "${1:-}" ] || exit 2; exit 0 ;;
  bundle|run)
    [ $# -ge 2 ] || die "$1 needs a BUNDLE directory; see --help"
    verb=$1; shift
    if [ "$verb" = bundle ]; then bundle "$@"; else run_there "$@"; fi ;;
  *) die "unknown command $1 (bundle or run); see --help" ;;
esac
